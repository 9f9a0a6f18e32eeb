"""Sequence classification: one label per text, with a SequenceClassifier (no perplexity)."""
from __future__ import annotations

import functools

import numpy as np

from transformer_jax import data, models
from transformer_jax.objectives.base import Objective, Task, TaskInputs, register_objective
from transformer_jax.objectives.common import accuracy, apply_model, load_token_splits, make_tokenizer
from transformer_jax.training import cross_entropy


def loss(model, params, batch, *, label_smoothing=0.0, **apply_kwargs):
    logits = apply_model(model, params, batch["tokens"], padding_mask=batch["padding_mask"], **apply_kwargs)
    return cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)


def make_model(cfg, config, facts):
    return models.SequenceClassifier(cfg, num_classes=len(facts["label_names"]), pooling=config.pooling,
                                     pooler=facts.get("pooler", False))


def build_task(inputs: TaskInputs):
    """data: a TSV file of (label, text) rows, or a corpus whose windows are told apart from
    the same windows shuffled ("shuffle": the stdlib corpus), drawn fresh every step from
    the train split (validation: from the val split)."""
    c = inputs.config
    b, t = c.batch_size, c.seq_len
    label_names = ["original", "shuffled"]
    if c.data.endswith(".tsv"):
        rows = data.read_tsv(c.data)
        tokenizer = make_tokenizer(inputs, "\n".join(x for _, x in rows))
        examples, label_names = data.encode_labelled(rows, tokenizer)
        train_source, val_source = data.split_examples(examples)
        draw = functools.partial(data.make_classify_batch, batch_size=b, seq_len=t, pad_id=tokenizer.pad_id)
    else:
        splits, tokenizer = load_token_splits(inputs, "stdlib" if c.data == "shuffle" else c.data)
        draw = functools.partial(data.make_shuffle_batch, batch_size=b, seq_len=t, pad_id=tokenizer.pad_id)
        train_source, val_source = splits.train, splits.val
    cfg = inputs.model_config(tokenizer.vocab_size)

    def make(source, seed, step):
        tokens, mask, labels = draw(source, seed=seed, step=step)
        return {"tokens": tokens, "padding_mask": mask, "labels": labels}

    facts = {"label_names": label_names}
    if c.init_from and c.pooling == "first":
        from transformer_jax.run.source import has_pooler

        if has_pooler(c.init_from):  # BERT's pooler (dense + tanh on [CLS]) comes along
            facts["pooler"] = True
    model = make_model(cfg, c, facts)
    val = [make(val_source, c.seed + 1, i) for i in range(c.eval_batches)]
    task = Task(model, (np.zeros((1, t), np.int32),),
                lambda step: make(train_source, c.seed, step), val,
                tokens_per_batch=b * t, init_kwargs={"padding_mask": np.ones((1, t), bool)},
                extra=facts,
                show=lambda params: accuracy(model, params, val, "tokens", "labels",
                                             "accuracy on the validation batches"))
    return task, cfg, tokenizer


CLASSIFY = register_objective(Objective(
    name="classify",
    description="classification (SequenceClassifier)",
    batch_keys={"tokens": "int32 [b, t]", "padding_mask": "bool [b, t]", "labels": "int32 [b]"},
    token_keys=("tokens",),
    loss=loss,
    build_task=build_task,
    make_model=make_model,
    default_data="shuffle",
    perplexity=False,
))
