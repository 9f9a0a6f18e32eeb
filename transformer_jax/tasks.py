"""Per-objective wiring: the model, batches and final demonstration of each training objective.

`build_task` turns an objective ("clm", "mlm", "seq2seq", "classify") and a data
spec into a `Task`: the model, a deterministic batch function, fixed validation
batches, and `show`, which renders what the trained model can do (a text sample,
translations, an accuracy). Batches are dicts of host NumPy arrays, laid out as
`training.make_loss_fn` expects for that objective.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np

from transformer_jax import data, models, tokenizers
from transformer_jax.config import ModelConfig
from transformer_jax.generation import generate
from transformer_jax.tokenizers import Tokenizer

OBJECTIVES = ("clm", "mlm", "seq2seq", "classify")


@dataclasses.dataclass
class Task:
    """One objective's model and data: host batches are dicts of NumPy arrays.

    Attributes:
      model: the Flax module to train.
      init_args: dummy positional inputs of `model.init`.
      train_batch: step -> the global training batch of that step (deterministic).
      val_batches: the fixed validation batches.
      tokens_per_batch: target tokens per global batch, for tokens/s.
      baseline: unigram entropy (nats) of the training tokens, where it is meaningful.
      init_kwargs: keyword inputs of `model.init` besides `init_args`.
      extra: task facts saved in the run's config.json (e.g. label names).
      show: params -> the final sample / demonstration, as text.
    """

    model: Any
    init_args: tuple
    train_batch: Callable[[int], dict]
    val_batches: list[dict]
    tokens_per_batch: int
    baseline: float | None = None
    init_kwargs: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    show: Callable[[Any], str] | None = None


def make_clm_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                   seq_len: int) -> dict:
    """A next-token batch {"inputs", "targets"}, int32 [batch_size, seq_len] each, from the
    1-D token array `tokens` (`build_task` looks it up at call time, so tests can wrap it)."""
    inputs, targets = data.get_batch(tokens, seed=seed, step=step, batch_size=batch_size,
                                     seq_len=seq_len)
    return {"inputs": inputs, "targets": targets}


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies of the 1-D int array `tokens`: the loss of
    a model that ignores context, so a language model's loss should end well below it."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def load_token_splits(data_spec: str, tokenizer: Tokenizer | None, *, tokenizer_kind: str = "char",
                      vocab_size: int = 4096) -> tuple[data.TokenSplits, Tokenizer]:
    """Load the corpus `data_spec` (see `data.load_text`), build a `tokenizer_kind` tokenizer
    on it unless `tokenizer` is given, and return the cached train/val token memmaps."""
    text = data.load_text(data_spec)
    if tokenizer is None:
        tokenizer = tokenizers.build_tokenizer(tokenizer_kind, text, vocab_size=vocab_size)
    cache = os.path.join(os.path.expanduser("~"), ".cache", "transformer_jax", "tokens")
    return data.prepare_tokens(text, tokenizer, cache), tokenizer


def build_task(objective: str, cfg_fn: Callable[[int], ModelConfig], *, data_spec: str,
               tokenizer: Tokenizer | None = None, tokenizer_kind: str = "char",
               vocab_size: int = 4096, batch_size: int, seq_len: int, seed: int = 0,
               eval_batches: int = 8, pooling: str = "mean",
               sample_tokens: int = 300) -> tuple[Task, ModelConfig, Tokenizer]:
    """The model, batches and tokenizer of `objective`.

    Args:
      objective: one of `OBJECTIVES`.
      cfg_fn: vocab_size -> the ModelConfig (the vocabulary is the tokenizer's).
      data_spec: clm/mlm: a corpus for `data.load_text`. seq2seq: a TSV file of
        (source, target) rows, or "reverse" (a synthetic task). classify: a TSV file
        of (label, text) rows, or a corpus whose windows are to be told apart from
        shuffled ones ("shuffle": the stdlib corpus).
      tokenizer: reuse this tokenizer (a resumed or fine-tuned run); None builds a
        `tokenizer_kind` tokenizer ("char", "byte", "bpe" or a tokenizer.json path) of
        at most `vocab_size` (BPE) on the data.
      batch_size, seq_len: the global batch; seq2seq lengths are at most `seq_len`.
      seed: the batch order; validation batches use `seed + 1`.
      eval_batches: how many fixed validation batches.
      pooling: classify: "mean" or "first".
      sample_tokens: clm: tokens of the text sample `show` generates.

    Returns:
      (task, model config, tokenizer).

    Raises:
      ValueError: an unknown objective, or data that cannot make a single batch.
    """
    b, t = batch_size, seq_len
    tok_options = dict(tokenizer_kind=tokenizer_kind, vocab_size=vocab_size)
    if objective in ("clm", "mlm"):
        splits, tokenizer = load_token_splits(data_spec, tokenizer, **tok_options)
        data.validate_seq_len(splits.train, t, name="the training split")
        data.validate_seq_len(splits.val, t, name="the validation split")
        cfg = cfg_fn(tokenizer.vocab_size)
        baseline = unigram_entropy(splits.train, tokenizer.vocab_size)
        if objective == "clm":
            make = functools.partial(make_clm_batch, batch_size=b, seq_len=t)
            model = models.DecoderLM(cfg)
        else:
            def make(tokens, *, seed, step):
                ids, labels, weights = data.get_mlm_batch(tokens, seed=seed, step=step, batch_size=b,
                                                          seq_len=t, tokenizer=tokenizer)
                return {"inputs": ids, "targets": labels, "weights": weights}
            model = models.MaskedLM(cfg)
        val = [make(splits.val, seed=seed + 1, step=i) for i in range(eval_batches)]
        if objective == "clm":
            prompt = tokenizer.decode(np.asarray(splits.val[:32]))
            show = lambda params: clm_sample(model, params, tokenizer, prompt,  # noqa: E731
                                             sample_tokens, seed=seed)
        else:
            show = lambda params: accuracy(  # noqa: E731
                model, params, val, "inputs", "targets", "masked-token accuracy on the validation batches")
        task = Task(model, (np.zeros((1, t), np.int32),),
                    lambda step: make(splits.train, seed=seed, step=step), val,
                    tokens_per_batch=b * t, baseline=baseline, show=show)
        return task, cfg, tokenizer

    if objective == "seq2seq":
        rows = data.reverse_pairs(2000, seed=seed) if data_spec == "reverse" else data.read_tsv(data_spec)
        if tokenizer is None:
            text = "\n".join(s + "\n" + t_ for s, t_ in rows)
            tokenizer = tokenizers.build_tokenizer(tokenizer_kind, text, vocab_size=vocab_size)
        train_pairs, val_pairs = data.split_examples(data.encode_pairs(rows, tokenizer))
        src_len, tgt_len = data.seq2seq_lengths(train_pairs + val_pairs)
        src_len, tgt_len = min(src_len, t), min(tgt_len, t)
        cfg = cfg_fn(tokenizer.vocab_size)
        ids = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)

        def make(pairs, *, seed, step):
            keys = ("src", "tgt_in", "tgt_out", "src_mask", "tgt_mask")
            return dict(zip(keys, data.make_seq2seq_batch(
                pairs, seed=seed, step=step, batch_size=b, src_len=src_len, tgt_len=tgt_len, **ids)))
        model = models.EncoderDecoder(cfg)
        task = Task(model, (np.zeros((1, src_len), np.int32), np.zeros((1, tgt_len), np.int32)),
                    lambda step: make(train_pairs, seed=seed, step=step),
                    [make(val_pairs, seed=seed + 1, step=i) for i in range(eval_batches)],
                    tokens_per_batch=b * tgt_len,
                    show=lambda params: translate(model, params, tokenizer, val_pairs[:16], tgt_len))
        return task, cfg, tokenizer

    if objective != "classify":
        raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")
    # TSV rows (label<TAB>text), or the synthetic task: original vs shuffled windows,
    # drawn fresh every step from the train split (validation: from the val split).
    label_names = ["original", "shuffled"]
    if data_spec.endswith(".tsv"):
        rows = data.read_tsv(data_spec)
        if tokenizer is None:
            tokenizer = tokenizers.build_tokenizer(tokenizer_kind, "\n".join(x for _, x in rows),
                                                   vocab_size=vocab_size)
        examples, label_names = data.encode_labelled(rows, tokenizer)
        train_ex, val_ex = data.split_examples(examples)
        draw = functools.partial(data.make_classify_batch, batch_size=b, seq_len=t,
                                 pad_id=tokenizer.pad_id)
        train_source, val_source = train_ex, val_ex
    else:
        corpus = "stdlib" if data_spec == "shuffle" else data_spec
        splits, tokenizer = load_token_splits(corpus, tokenizer, **tok_options)
        draw = functools.partial(data.make_shuffle_batch, batch_size=b, seq_len=t,
                                 pad_id=tokenizer.pad_id)
        train_source, val_source = splits.train, splits.val
    cfg = cfg_fn(tokenizer.vocab_size)

    def make(source, *, seed, step):
        tokens, mask, labels = draw(source, seed=seed, step=step)
        return {"tokens": tokens, "padding_mask": mask, "labels": labels}
    model = models.SequenceClassifier(cfg, num_classes=len(label_names), pooling=pooling)
    val = [make(val_source, seed=seed + 1, step=i) for i in range(eval_batches)]
    task = Task(model, (np.zeros((1, t), np.int32),),
                lambda step: make(train_source, seed=seed, step=step), val,
                tokens_per_batch=b * t, init_kwargs={"padding_mask": np.ones((1, t), bool)},
                extra={"label_names": label_names},
                show=lambda params: accuracy(model, params, val, "tokens", "labels",
                                             "accuracy on the validation batches"))
    return task, cfg, tokenizer


TOKEN_KEYS = ("inputs", "targets", "src", "tgt_in", "tgt_out", "tokens")


def check_batch(batch: dict, cfg: ModelConfig) -> None:
    """Raise ValueError unless every token array of a host `batch` fits `cfg`.

    Token ids must lie in [0, vocab_size) and lengths within a learned position table
    (`models.check_tokens`); inside jit the models would clamp bad ids silently.
    """
    for key in TOKEN_KEYS:
        if key in batch:
            models.check_tokens(batch[key], cfg, name=f"batch[{key!r}]")


def accuracy(model: Any, params: Any, batches: list[dict], input_key: str, label_key: str,
             what: str) -> str:
    """'<what>: 93.1% (of n)': argmax predictions of `model` on `batch[input_key]` against
    `batch[label_key]` over `batches`, weighted by `batch["weights"]` where present."""
    @jax.jit
    def counts(params, batch):
        logits = model.apply({"params": params}, batch[input_key],
                             padding_mask=batch.get("padding_mask"))
        weights = batch.get("weights", jax.numpy.ones(batch[label_key].shape))
        return ((logits.argmax(-1) == batch[label_key]) * weights).sum(), weights.sum()

    right, total = np.sum(jax.device_get([counts(params, b) for b in batches]), axis=0)
    return f"{what}: {100 * right / max(total, 1):.1f}% (of {int(total)})"


def translate(model: models.EncoderDecoder, params: Any, tokenizer: Tokenizer,
              pairs: list[tuple[np.ndarray, np.ndarray]], max_new_tokens: int) -> str:
    """Greedy translations of `pairs` (source ids, target ids), one line each, then the
    exact-match rate."""
    out = generate(model, params, [[int(i) for i in src] for src, _ in pairs],
                   max_new_tokens=max_new_tokens, strategy="greedy", bos_id=tokenizer.bos_id,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    lines, right = [], 0
    for (src, tgt), tokens, n in zip(pairs, np.asarray(out.tokens), np.asarray(out.lengths)):
        pred = [int(i) for i in tokens[:n] if i != tokenizer.eos_id]
        right += pred == [int(i) for i in tgt]
        lines.append(f"{tokenizer.decode(src)!r} -> {tokenizer.decode(pred)!r} "
                     f"(expected {tokenizer.decode(tgt)!r})")
    return "\n".join(lines + [f"exact match: {right}/{len(pairs)}"])


def clm_sample(model: models.DecoderLM, params: Any, tokenizer: Tokenizer, prompt: str,
               max_new_tokens: int, *, seed: int, strategy: str = "sample",
               temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
               num_beams: int = 4) -> str:
    """`prompt` followed by up to `max_new_tokens` generated tokens, as text.

    Beyond the model's context (cfg.max_len) generation continues in windows whose
    prompt is the last half-context. Every window is passed right-padded to that one
    width, with the same `max_new_tokens`, so `generate` compiles once. Generation
    stops early at the tokenizer's end-of-sequence token (not included in the text).

    Raises:
      ValueError: `prompt` encodes to no tokens.
    """
    ids = [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise ValueError(f"prompt={prompt!r} encodes to no tokens")
    width = model.cfg.max_len // 2
    eos_id = getattr(tokenizer, "eos_id", None)
    options = dict(strategy=strategy, num_beams=num_beams, eos_id=eos_id,
                   max_new_tokens=model.cfg.max_len - width + 1)
    if strategy == "sample":
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    key, new = jax.random.PRNGKey(seed), []
    while len(new) < max_new_tokens:
        window = (ids + new)[-width:]
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(window)] = window
        key, step_key = jax.random.split(key)
        if strategy == "sample":
            options["rng"] = step_key
        out = generate(model, params, padded, prompt_lengths=np.array([len(window)], np.int32),
                       **options)
        n = int(np.asarray(out.lengths)[0])
        tokens = [int(t) for t in np.asarray(out.tokens)[0, :n]]
        if eos_id is not None and eos_id in tokens:
            new += tokens[:tokens.index(eos_id)]
            break
        new += tokens
    return prompt + tokenizer.decode(new[:max_new_tokens])
