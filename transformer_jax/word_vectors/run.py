"""A word-vector run on a directory, with the same machinery as the other objectives:
``config.json``, Orbax checkpoints (exact resume: batches are pure functions of
``(seed, step)``), ``metrics.jsonl``, a tqdm progress bar, a checkpoint on SIGINT/SIGTERM,
and at the end ``vectors.txt`` (word2vec text format) and ``vocab.txt`` (word and count).

    kv = train_word_vectors(WordVectorConfig(objective="skipgram", data="shakespeare"), "runs/sg")
    kv.most_similar("king")
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh

from transformer_jax import checkpoint
from transformer_jax.run_log import RunLog
from transformer_jax.word_vectors import sharding as wv_sharding
from transformer_jax.word_vectors.config import WordVectorConfig
from transformer_jax.word_vectors.corpus import encode_corpus
from transformer_jax.word_vectors.keyed_vectors import KeyedVectors
from transformer_jax.word_vectors.objectives import OBJECTIVES
from transformer_jax.word_vectors.vocabulary import build_vocabulary, tokenize

VECTORS_FILE = "vectors.txt"
VOCAB_FILE = "vocab.txt"


def train_word_vectors(config: WordVectorConfig, out_dir: str | os.PathLike, *,
                       text: str | None = None, mesh: Mesh | None = None,
                       max_steps: int | None = None, progress: bool = True) -> KeyedVectors:
    """Train (or resume) the run in ``out_dir`` and return its vectors.

    text: the corpus (default ``load_text(config.data)``). mesh: split the tables over it
    (``transformer_jax.make_mesh``). max_steps: stop (with a checkpoint) after this many
    steps in all, e.g. to continue later; the final files are written only when the run
    completes its epochs. Resuming needs the same configuration and corpus: a
    ``config.json`` that differs is refused (ValueError).
    """
    if not isinstance(config, WordVectorConfig):
        raise TypeError(f"config must be a WordVectorConfig, got {type(config).__name__}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _check_config(config, out_dir)
    if text is None:
        from transformer_jax.data import load_text
        text = load_text(config.data)
    sentences = tokenize(text, lowercase=config.lowercase)
    vocab = build_vocabulary(sentences, min_count=config.min_count)
    corpus = encode_corpus(sentences, vocab, os.path.join(out_dir, "data"))
    objective = OBJECTIVES[config.objective]
    prepared = objective.prepare(config, vocab, corpus, mesh)
    state = objective.init_state(config, prepared, mesh)
    shardings = None if mesh is None else wv_sharding.state_shardings(state, mesh)
    step_fn = objective.make_step(config, prepared, mesh)
    end = prepared.total_steps if max_steps is None else min(max_steps, prepared.total_steps)
    is_main = jax.process_index() == 0
    # XLA:CPU's virtual devices deadlocked (a collective-permute rendezvous never completing)
    # with several sharded steps in flight: there, wait for each step
    serialize = mesh is not None and mesh.devices.flat[0].platform == "cpu"

    with checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=2,
                                 keep_best=0) as ckpt, _StopSignals() as stop:
        restored = ckpt.restore(checkpoint.abstract_state(state, shardings))
        state = state if restored is None else restored
        start = int(state.step)
        log = RunLog(out_dir, start, enabled=is_main)
        bar = _progress_bar(prepared.total_steps, start, progress and is_main)
        epoch, inputs, pending = None, None, []
        t0, s0 = time.perf_counter(), start
        for s in range(start, end):
            if s // prepared.steps_per_epoch != epoch:
                epoch = s // prepared.steps_per_epoch
                inputs = objective.epoch_inputs(config, prepared, epoch)
            state, metrics = step_fn(state, inputs)
            if serialize:
                jax.block_until_ready(state)
            pending.append(metrics)
            done = s + 1
            if done % config.log_every == 0 or done == end:
                record = _summarise(pending, done, epoch, prepared, time.perf_counter() - t0, done - s0)
                pending = []
                log.write(record)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", refresh=False)
            bar.update(1)
            if done % config.checkpoint_every == 0 or done == end or stop.received:
                ckpt.save(done, state)
            if stop.received:
                break
        ckpt.wait()
        bar.close()
        log.close()
    kv = KeyedVectors(vocab.words, objective.vectors(state.params)[:len(vocab)], vocab.counts)
    if int(state.step) >= prepared.total_steps and is_main:
        kv.save_word2vec_format(os.path.join(out_dir, VECTORS_FILE))
        _write_vocab(os.path.join(out_dir, VOCAB_FILE), vocab.words, vocab.counts)
    return kv


def _summarise(pending: list[dict], step: int, epoch: int, prepared, seconds: float, steps: int) -> dict:
    totals = {k: float(np.sum([float(m[k]) for m in pending])) for k in ("loss_sum", "pairs")}
    return {"step": step, "epoch": epoch,
            "train_loss": totals["loss_sum"] / max(totals["pairs"], 1.0),
            "learning_rate": float(pending[-1]["learning_rate"]),
            "words_per_s": prepared.words_per_step * steps / max(seconds, 1e-9),
            "elapsed_s": seconds}


def _check_config(config: WordVectorConfig, out_dir: str) -> None:
    path = os.path.join(out_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != config.to_dict():
            changed = sorted(k for k in set(saved) | set(config.to_dict())
                             if saved.get(k) != config.to_dict().get(k))
            raise ValueError(
                f"{out_dir} holds a run with a different configuration (fields {changed} differ): "
                f"use another out_dir or the same configuration to resume")
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    os.replace(tmp, path)


def _write_vocab(path: str, words, counts) -> None:
    """gensim's ``fvocab`` format: one ``word count`` per line."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{w} {int(c)}\n" for w, c in zip(words, counts))
    os.replace(tmp, path)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled)


class _StopSignals:
    """Within the block, SIGINT/SIGTERM set ``received`` (the loop checkpoints and stops)
    instead of killing the run; a no-op outside the main thread."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def load_word_vectors(out_dir: str | os.PathLike) -> KeyedVectors:
    """The vectors of a finished run: ``vectors.txt`` with the counts of ``vocab.txt``."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, VECTORS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {VECTORS_FILE} in {out_dir}: the run has not finished its epochs")
    kv = KeyedVectors.load_word2vec_format(path)
    counts_path = os.path.join(out_dir, VOCAB_FILE)
    if os.path.isfile(counts_path):
        with open(counts_path, encoding="utf-8") as f:
            counts = dict(line.split() for line in f if line.strip())
        kv.counts = np.array([int(counts[w]) for w in kv.words], dtype=np.int64)
    return kv
