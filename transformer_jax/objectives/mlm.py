"""Masked language modelling (BERT): 15% of tokens masked 80/10/10, with a MaskedLM."""
from __future__ import annotations

import numpy as np

from transformer_jax import data, models
from transformer_jax.objectives.base import Objective, Task, TaskInputs, register_objective
from transformer_jax.objectives.common import accuracy, apply_model, load_token_splits, unigram_entropy
from transformer_jax.training import cross_entropy


def loss(model, params, batch, *, label_smoothing=0.0, **apply_kwargs):
    logits = apply_model(model, params, batch["inputs"], padding_mask=batch.get("padding_mask"),
                         **apply_kwargs)
    return cross_entropy(logits, batch["targets"], batch["weights"], label_smoothing=label_smoothing)


def make_model(cfg, config, facts):
    return models.MaskedLM(cfg)


def build_task(inputs: TaskInputs):
    c = inputs.config
    splits, tokenizer = load_token_splits(inputs, c.data)
    data.validate_seq_len(splits.train, c.seq_len, name="the training split")
    data.validate_seq_len(splits.val, c.seq_len, name="the validation split")
    cfg = inputs.model_config(tokenizer.vocab_size)
    model = make_model(cfg, c, {})

    def make(tokens, seed, step):
        ids, labels, weights = data.get_mlm_batch(tokens, seed=seed, step=step, batch_size=c.batch_size,
                                                  seq_len=c.seq_len, tokenizer=tokenizer)
        return {"inputs": ids, "targets": labels, "weights": weights}

    val = [make(splits.val, c.seed + 1, i) for i in range(c.eval_batches)]
    task = Task(model, (np.zeros((1, c.seq_len), np.int32),),
                lambda step: make(splits.train, c.seed, step), val,
                tokens_per_batch=c.batch_size * c.seq_len,
                baseline=unigram_entropy(splits.train, tokenizer.vocab_size),
                show=lambda params: accuracy(model, params, val, "inputs", "targets",
                                             "masked-token accuracy on the validation batches"))
    return task, cfg, tokenizer


MLM = register_objective(Objective(
    name="mlm",
    description="masked LM: BERT masking (MaskedLM)",
    batch_keys={"inputs": "int32 [b, t]", "targets": "int32 [b, t]", "weights": "float [b, t]",
                "padding_mask": "optional bool [b, t]"},
    token_keys=("inputs", "targets"),
    loss=loss,
    build_task=build_task,
    make_model=make_model,
    model_kind="masked_lm",
))
