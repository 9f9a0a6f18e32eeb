"""Translation (the original transformer): source -> target with an EncoderDecoder."""
from __future__ import annotations

import numpy as np

from transformer_jax import data, models
from transformer_jax.generation import generate
from transformer_jax.objectives.base import Objective, Task, TaskInputs, register_objective
from transformer_jax.objectives.common import apply_model, make_tokenizer
from transformer_jax.tokenizers import Tokenizer
from transformer_jax.training import cross_entropy

KEYS = ("src", "tgt_in", "tgt_out", "src_mask", "tgt_mask")


def loss(model, params, batch, *, label_smoothing=0.0, **apply_kwargs):
    logits = apply_model(model, params, batch["src"], batch["tgt_in"], src_padding_mask=batch["src_mask"],
                         **apply_kwargs)
    return cross_entropy(logits, batch["tgt_out"], batch["tgt_mask"], label_smoothing=label_smoothing)


def translate(model: models.EncoderDecoder, params, tokenizer: Tokenizer,
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


def make_model(cfg, config, facts):
    return models.EncoderDecoder(cfg)


def build_task(inputs: TaskInputs):
    """data: a TSV file of (source, target) rows, or "reverse" (a synthetic task)."""
    c = inputs.config
    rows = data.reverse_pairs(2000, seed=c.seed) if c.data == "reverse" else data.read_tsv(c.data)
    tokenizer = make_tokenizer(inputs, "\n".join(s + "\n" + t for s, t in rows))
    train_pairs, val_pairs = data.split_examples(data.encode_pairs(rows, tokenizer))
    cfg = inputs.model_config(tokenizer.vocab_size)
    # Sources are never cut (targets are, to tgt_len): an empty or too long one is an error
    # now, not at the final sample.
    limit = min(c.seq_len, cfg.max_len) if cfg.pos_encoding == "learned" else c.seq_len
    data.check_pairs(train_pairs + val_pairs, max_src_len=limit, source=f"--data {c.data}")
    src_len, tgt_len = data.seq2seq_lengths(train_pairs + val_pairs)
    src_len, tgt_len = min(src_len, c.seq_len), min(tgt_len, c.seq_len)
    ids = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)

    def make(pairs, seed, step):
        return dict(zip(KEYS, data.make_seq2seq_batch(
            pairs, seed=seed, step=step, batch_size=c.batch_size, src_len=src_len, tgt_len=tgt_len, **ids)))

    model = make_model(cfg, c, {})
    task = Task(model, (np.zeros((1, src_len), np.int32), np.zeros((1, tgt_len), np.int32)),
                lambda step: make(train_pairs, c.seed, step),
                [make(val_pairs, c.seed + 1, i) for i in range(c.eval_batches)],
                tokens_per_batch=c.batch_size * tgt_len,
                show=lambda params: translate(model, params, tokenizer, val_pairs[:16], tgt_len))
    return task, cfg, tokenizer


SEQ2SEQ = register_objective(Objective(
    name="seq2seq",
    description="translation: source -> target (EncoderDecoder), label smoothing 0.1",
    batch_keys={"src": "int32 [b, s]", "tgt_in": "int32 [b, t]", "tgt_out": "int32 [b, t]",
                "src_mask": "bool [b, s]", "tgt_mask": "float [b, t]"},
    token_keys=("src", "tgt_in", "tgt_out"),
    loss=loss,
    build_task=build_task,
    make_model=make_model,
    default_data="reverse",
    default_label_smoothing=0.1,
    model_kind="encoder_decoder",
))
