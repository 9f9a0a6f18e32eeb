"""A word-vector run on a directory, with the same machinery as the other objectives:
``config.json``, Orbax checkpoints (exact resume: batches are pure functions of
``(seed, step)``), ``metrics.jsonl``, a tqdm progress bar, a checkpoint on SIGINT/SIGTERM,
and at the end ``vectors.txt`` (word2vec text format) and ``vocab.txt`` (word and count).

The run directory keeps the rules of transformer_jax/run_dir.py, as a transformer run's:
a fresh run goes into a missing or empty folder only, ``overwrite`` removes only what the
package wrote, a folder with checkpoints but no readable config.json is an error, one
writer at a time (run.lock), atomic writes, a full disk is one DiskFullError, and a stop
signal says truthfully which step it saved.

    kv = train_word_vectors(WordVectorConfig(objective="skipgram", data="shakespeare"), "runs/sg")
    kv.most_similar("king")
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from transformer_jax import checkpoint, run_dir
from transformer_jax.run_log import RunLog
from transformer_jax.stop_signal import StopSignal, say_saved
from transformer_jax.word_vectors import sharding as wv_sharding
from transformer_jax.word_vectors.config import WordVectorConfig
from transformer_jax.word_vectors.corpus import encode_corpus
from transformer_jax.word_vectors.keyed_vectors import KeyedVectors
from transformer_jax.word_vectors.objectives import OBJECTIVES
from transformer_jax.word_vectors.vocabulary import build_vocabulary, tokenize

VECTORS_FILE = "vectors.txt"
VOCAB_FILE = "vocab.txt"
CORPUS_DIR = "encoded_corpus"  # the memmapped word ids (run_dir.RUN_DIRS lists it)


def train_word_vectors(config: WordVectorConfig, out_dir: str | os.PathLike, *,
                       text: str | None = None, mesh: Mesh | None = None,
                       max_steps: int | None = None, progress: bool = True, overwrite: bool = False,
                       resume: bool = False, say: Callable[[str], None] | None = None) -> KeyedVectors:
    """Train (or resume) the run in ``out_dir`` and return its vectors.

    text: the corpus (default ``load_text(config.data)``). mesh: split the tables over it
    (``transformer_jax.make_mesh``). max_steps: stop (with a checkpoint) after this many
    steps in all, e.g. to continue later; the final files are written only when the run
    completes its epochs. overwrite: replace the run in ``out_dir`` (only the package's
    files are removed); resume: require a run there to continue. say: prints progress
    (default: print on process 0).

    Resuming needs the same configuration and corpus. Raises ValueError (before writing
    anything) for a ``config.json`` that differs, a non-empty folder that is not a run, a
    run that lost its config.json (run_dir.RunDirError), another live run holding the
    directory (run_dir.RunLockedError); run_dir.DiskFullError for a full disk.
    """
    if not isinstance(config, WordVectorConfig):
        raise TypeError(f"config must be a WordVectorConfig, got {type(config).__name__}")
    out_dir = os.fspath(out_dir)
    is_main = jax.process_index() == 0
    say = say or (print if is_main else (lambda *a, **k: None))
    if text is None:
        from transformer_jax.data import load_text
        text = load_text(config.data)
    sentences = tokenize(text, lowercase=config.lowercase)
    vocab = build_vocabulary(sentences, min_count=config.min_count)
    with run_dir.disk_full_as_error(out_dir, "training word vectors"), \
            run_dir.open_run_dir_on_all_processes(out_dir, overwrite=overwrite, resume=resume,
                                                  check=functools.partial(_check_config, config, out_dir)):
        if is_main:
            run_dir.write_json_atomic(os.path.join(out_dir, run_dir.CONFIG_FILE), config.to_dict())
        return _train_locked(config, out_dir, sentences, vocab, mesh, max_steps, progress, is_main, say)


def _train_locked(config: WordVectorConfig, out_dir: str, sentences, vocab, mesh: Mesh | None,
                  max_steps: int | None, progress: bool, is_main: bool,
                  say: Callable[[str], None]) -> KeyedVectors:
    """`train_word_vectors`'s body once the run directory is locked."""
    corpus = encode_corpus(sentences, vocab, os.path.join(out_dir, CORPUS_DIR))
    objective = OBJECTIVES[config.objective]
    prepared = objective.prepare(config, vocab, corpus, mesh)
    state = objective.init_state(config, prepared, mesh)
    shardings = None if mesh is None else wv_sharding.state_shardings(state, mesh)
    step_fn = objective.make_step(config, prepared, mesh)
    end = prepared.total_steps if max_steps is None else min(max_steps, prepared.total_steps)
    # XLA:CPU's virtual devices deadlocked (a collective-permute rendezvous never completing)
    # with several sharded steps in flight: there, wait for each step
    serialize = mesh is not None and mesh.devices.flat[0].platform == "cpu"

    with checkpoint.Checkpointer(os.path.join(out_dir, run_dir.CHECKPOINT_DIR), max_to_keep=2,
                                 keep_best=0) as ckpt, StopSignal() as stop:
        restored = ckpt.restore(checkpoint.abstract_state(state, shardings))
        state = state if restored is None else restored
        start = done = int(state.step)
        log = RunLog(out_dir, start, enabled=is_main)
        bar = _progress_bar(prepared.total_steps, start, progress and is_main)
        epoch, inputs, pending = None, None, []
        t0, s0 = time.perf_counter(), start
        try:
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
                # asked after logging: a signal during it still saves this step. The log
                # steps are the sync points where several processes agree on a stop.
                stopping = stop.now(sync_point=done % config.log_every == 0 or done == end)
                if done % config.checkpoint_every == 0 or done == end or stopping:
                    stopping = stop.save(ckpt, done, state, say)
                if stopping:
                    break
            if stop.stopping and done > start:
                say_saved(ckpt, stop.stopping, done, say)
            ckpt.wait()
        finally:
            bar.close()
            log.close()
    kv = KeyedVectors(vocab.words, objective.vectors(state.params)[:len(vocab)], vocab.counts)
    if int(state.step) >= prepared.total_steps:
        if is_main:
            kv.save_word2vec_format(os.path.join(out_dir, VECTORS_FILE))
            _write_vocab(os.path.join(out_dir, VOCAB_FILE), vocab.words, vocab.counts)
            say(f"{len(kv.words)} word vectors of dimension {config.dimension}: "
                f"{os.path.join(out_dir, VECTORS_FILE)}")
    elif not stop.stopping:
        say(f"stopped at step {done} of {prepared.total_steps} (max_steps), saved: run again to continue")
    return kv


def _summarise(pending: list[dict], step: int, epoch: int, prepared, seconds: float, steps: int) -> dict:
    totals = {k: float(np.sum([float(m[k]) for m in pending])) for k in ("loss_sum", "pairs")}
    return {"step": step, "epoch": epoch,
            "train_loss": totals["loss_sum"] / max(totals["pairs"], 1.0),
            "learning_rate": float(pending[-1]["learning_rate"]),
            "words_per_s": prepared.words_per_step * steps / max(seconds, 1e-9),
            "elapsed_s": seconds}


def _check_config(config: WordVectorConfig, out_dir: str, status: run_dir.RunDirStatus) -> None:
    """A resumed run's config.json must be `config` (process 0, under the run's lock)."""
    if not status.resume:
        return
    saved, wanted = status.config, config.to_dict()
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(
            f"{out_dir} holds a run with a different configuration (fields {changed} differ): "
            f"use another out_dir, --overwrite to replace it, or the same configuration to resume")


def _write_vocab(path: str, words, counts) -> None:
    """gensim's ``fvocab`` format: one ``word count`` per line."""
    run_dir.write_atomic(path, "".join(f"{w} {int(c)}\n" for w, c in zip(words, counts)))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled)


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
