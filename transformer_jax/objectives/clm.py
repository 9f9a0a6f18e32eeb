"""Causal language modelling (GPT): predict every next token, with a DecoderLM."""
from __future__ import annotations

import numpy as np

from transformer_jax import data, models
from transformer_jax.generation import generate_text
from transformer_jax.objectives.base import Objective, Task, TaskInputs, register_objective
from transformer_jax.objectives.common import apply_model, load_token_splits, unigram_entropy
from transformer_jax.training import cross_entropy

PROMPT_TOKENS = 32  # the final sample continues this many tokens of validation text


def make_clm_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                   seq_len: int) -> dict:
    """A next-token batch {"inputs", "targets"}, int32 [batch_size, seq_len] each, from the
    1-D token array `tokens` (the task looks it up at call time, so tests can wrap it)."""
    inputs, targets = data.get_batch(tokens, seed=seed, step=step, batch_size=batch_size,
                                     seq_len=seq_len)
    return {"inputs": inputs, "targets": targets}


def loss(model, params, batch, *, label_smoothing=0.0, **apply_kwargs):
    logits = apply_model(model, params, batch["inputs"], **apply_kwargs)
    return cross_entropy(logits, batch["targets"], batch.get("weights"), label_smoothing=label_smoothing)


def format_sample(prompt: str, continuation: str) -> str:
    """The final sample with the prompt set apart from what the model wrote."""
    return (f"[prompt, copied from the validation text]\n{prompt}\n"
            f"[the model's continuation]\n{continuation}")


def make_model(cfg, config, facts):
    return models.DecoderLM(cfg)


def build_task(inputs: TaskInputs):
    c = inputs.config
    splits, tokenizer = load_token_splits(inputs, c.data)
    data.validate_seq_len(splits.train, c.seq_len, name="the training split")
    data.validate_seq_len(splits.val, c.seq_len, name="the validation split")
    cfg = inputs.model_config(tokenizer.vocab_size)
    model = make_model(cfg, c, {})

    def make(tokens, seed, step):  # make_clm_batch is looked up at call time: tests wrap it
        return make_clm_batch(tokens, seed=seed, step=step, batch_size=c.batch_size, seq_len=c.seq_len)

    val = [make(splits.val, c.seed + 1, i) for i in range(c.eval_batches)]
    prompt = tokenizer.decode(np.asarray(splits.val[:PROMPT_TOKENS]))

    def show(params) -> str:
        return format_sample(prompt, generate_text(model, params, tokenizer, prompt, c.sample_tokens,
                                                   seed=c.seed))

    task = Task(model, (np.zeros((1, c.seq_len), np.int32),),
                lambda step: make(splits.train, c.seed, step), val,
                tokens_per_batch=c.batch_size * c.seq_len,
                baseline=unigram_entropy(splits.train, tokenizer.vocab_size), show=show)
    return task, cfg, tokenizer


CLM = register_objective(Objective(
    name="clm",
    description="causal LM: next-token prediction (DecoderLM)",
    batch_keys={"inputs": "int32 [b, t]", "targets": "int32 [b, t]",
                "weights": "optional float [b, t]"},
    token_keys=("inputs", "targets"),
    loss=loss,
    build_task=build_task,
    make_model=make_model,
    model_kind="decoder_lm",
))
