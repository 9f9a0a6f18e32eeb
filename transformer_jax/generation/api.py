"""`generate`: the public entry point over DecoderLM and EncoderDecoder."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax import models
from transformer_jax.generation.beam import beam_search
from transformer_jax.generation.interface import GenerateOutput
from transformer_jax.generation.loop import decode, greedy_select, sampling_select
from transformer_jax.generation.model_steps import decoder_lm_steps, encoder_decoder_steps
from transformer_jax.generation.validate import check_context, check_options, prepare_prompts


def generate(
    model: nn.Module,
    params: Any,
    prompts: jax.typing.ArrayLike | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    prompt_lengths: jax.typing.ArrayLike | None = None,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    return_all_beams: bool = False,
    eos_id: int | None = None,
    pad_id: int = 0,
    bos_id: int | None = None,
    rng: jax.Array | int | None = None,
    use_cache: bool = True,
    suppress_ids: Sequence[int] = (),
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens after each prompt (or source sentence).

    The prompts are prefilled into the KV cache in one call, then a jit-compiled
    `lax.while_loop` feeds one token per step and stops early once every row has
    emitted `eos_id`. Rows are independent: a row's output does not depend on the
    other rows or their padding (with sampling, the random draws do). Call it with
    concrete inputs (not under `jax.jit`): it validates them and compiles itself,
    once per model, input shape and set of static options.

    Args:
      model: a `DecoderLM` (continues each prompt) or an `EncoderDecoder` (encodes each
        source once, then decodes from `bos_id`, cross-attending to the encoding).
      params: the model's parameters (`variables["params"]`; a `{"params": ...}`
        variables dict is accepted too).
      prompts: token ids, either a list of lists of ints (of any lengths; padded here)
        or an integer array `[batch, length]`, right-padded, with `prompt_lengths`.
        For an EncoderDecoder these are the source sentences.
      max_new_tokens: the most tokens to generate per row, >= 1.
      prompt_lengths: int `[batch]`, tokens of each row of an array `prompts` (default:
        the full width); must be None for a list of lists.
      strategy: "greedy" (argmax each step), "sample" (draw from the processed
        distribution; needs `rng`) or "beam" (beam search).
      temperature: "sample": divides the logits, > 0 (< 1 sharpens, > 1 flattens).
      top_k: "sample": keep only the `top_k` (>= 1) most likely tokens (ties at the
        boundary are kept too); None keeps all.
      top_p: "sample": keep the smallest set of most likely tokens whose probability
        reaches `top_p`, in (0, 1]; None keeps all. Applied after temperature and
        top-k, which combine with it.
      num_beams: "beam": hypotheses kept per row, >= 1. `num_beams=1` runs greedy
        decoding (beam search of width one).
      length_penalty: "beam": hypotheses are ranked by `log p / length **
        length_penalty` (length = new tokens, EOS included); 0 ranks by log p alone,
        larger values favour longer outputs.
      return_all_beams: "beam": return all `num_beams` hypotheses per row, best first,
        instead of the best one (outputs get a beam axis).
      eos_id: end-of-sequence id; a row (or hypothesis) ends after emitting it. None:
        every row gets exactly `max_new_tokens` tokens.
      pad_id: fills each output row after its EOS.
      bos_id: EncoderDecoder only, required there: the decoder's start token.
      rng: "sample": a `jax.random.key` or an int seed. The same rng, inputs and
        options give the same tokens.
      use_cache: False recomputes a full forward pass over the whole sequence at every
        step instead of using the KV cache: the same tokens (up to float rounding), much
        slower; for testing and benchmarking.
      suppress_ids: token ids never generated (their logits are set to -inf before
        every choice, so probabilities renormalise over the rest), e.g. Marian's pad id.
        Hugging Face's `bad_words_ids` / `suppress_tokens` mask log-probabilities
        instead, without renormalising: the same greedy tokens, but beam scores (and so
        occasionally the ranking of beams) can differ.

    Returns:
      `GenerateOutput(tokens, lengths, scores)`, the new tokens only (no prompt):
      tokens int32 `[batch, max_new_tokens]`, EOS included, then `pad_id`; lengths
      int32 `[batch]`, new tokens per row, EOS included; scores float32 `[batch]`: the
      sum of the model's log-probabilities of the new tokens (before temperature,
      top-k, top-p), divided by `lengths ** length_penalty` for beam search. With
      `return_all_beams` each has a beam axis after batch, sorted best first (score
      `-inf`: fewer distinct hypotheses than beams exist).

    Raises:
      TypeError: `model` is neither a DecoderLM nor an EncoderDecoder, `prompts` is
        neither an integer array nor a list of lists, or `rng` is neither a key nor
        an int.
      ValueError: an empty batch or prompt, bad `prompt_lengths`, token ids outside
        [0, vocab_size), a prompt plus `max_new_tokens` longer than `cfg.max_len` (a
        DecoderLM needs the padded prompt width + max_new_tokens - 1 positions; an
        EncoderDecoder's source width and max_new_tokens must each fit), an unknown
        strategy, max_new_tokens < 1, temperature <= 0, top_k < 1, top_p outside
        (0, 1], num_beams < 1, sampling without rng, or a missing bos_id.

    Example:
      >>> out = generate(model, params, [[5, 7, 9], [4]], max_new_tokens=20,
      ...                strategy="sample", temperature=0.8, top_p=0.9, eos_id=2, rng=0)
      >>> out.tokens[0, : out.lengths[0]]  # the first prompt's continuation
    """
    if not isinstance(model, (models.DecoderLM, models.EncoderDecoder)):
        raise TypeError(f"model must be a DecoderLM or an EncoderDecoder, got {type(model).__name__}")
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    cfg = model.cfg
    check_options(
        strategy=strategy, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, eos_id=eos_id,
        pad_id=pad_id, bos_id=bos_id, rng=rng, vocab_size=cfg.vocab_size,
        encoder_decoder=isinstance(model, models.EncoderDecoder),
    )
    prompts, lengths = prepare_prompts(prompts, prompt_lengths, vocab_size=cfg.vocab_size)
    suppress_ids = _check_suppress_ids(suppress_ids, cfg.vocab_size)
    if isinstance(model, models.EncoderDecoder):
        check_context(prompts.shape[1], cfg.max_len, f"the source width ({prompts.shape[1]} tokens)")
        check_context(max_new_tokens, cfg.max_len, f"max_new_tokens={max_new_tokens}")
        cache_len = max_new_tokens  # the start token and every generated token but the last
    else:
        cache_len = prompts.shape[1] + max_new_tokens - 1  # the last token is never fed back
        check_context(
            cache_len, cfg.max_len,
            f"the prompt width ({prompts.shape[1]} tokens) + max_new_tokens={max_new_tokens} - 1",
        )
    beam_as_greedy = strategy == "beam" and num_beams == 1  # beam search of width one
    if rng is not None and not isinstance(rng, jax.Array):
        rng = jax.random.key(rng)  # an int seed
    sampling = None
    if strategy == "sample":
        sampling = dict(
            temperature=jnp.float32(temperature),
            top_k=None if top_k is None else jnp.int32(top_k),
            top_p=None if top_p is None else jnp.float32(top_p),
        )
    out = _generate(
        model, params, jnp.asarray(prompts), jnp.asarray(lengths), rng if sampling else None,
        sampling, jnp.float32(length_penalty),
        # Static arguments the strategy or model ignores are normalised: no recompiling.
        strategy="greedy" if beam_as_greedy else strategy, max_new_tokens=max_new_tokens,
        num_beams=num_beams if strategy == "beam" else 1, eos_id=eos_id, pad_id=pad_id,
        bos_id=bos_id if isinstance(model, models.EncoderDecoder) else None,
        cache_len=cache_len, use_cache=use_cache, suppress_ids=suppress_ids,
    )
    if beam_as_greedy:  # give greedy's output the beam axis and the beam score
        penalty = out.lengths.astype(jnp.float32) ** length_penalty
        out = GenerateOutput(out.tokens[:, None], out.lengths[:, None], (out.scores / penalty)[:, None])
    if strategy == "beam" and not return_all_beams:
        out = GenerateOutput(*(x[:, 0] for x in out))
    return out


@functools.partial(
    jax.jit,
    static_argnames=(
        "model", "strategy", "max_new_tokens", "num_beams", "eos_id", "pad_id", "bos_id",
        "cache_len", "use_cache", "suppress_ids",
    ),
)
def _generate(
    model, params, prompts, lengths, rng, sampling, length_penalty, *,
    strategy, max_new_tokens, num_beams, eos_id, pad_id, bos_id, cache_len, use_cache, suppress_ids,
) -> GenerateOutput:
    """The compiled part of `generate`: prefill, then the strategy's decoding loop."""
    copies = num_beams if strategy == "beam" else 1
    if isinstance(model, models.EncoderDecoder):
        steps = encoder_decoder_steps(
            model, params, prompts, lengths, start_id=bos_id, cache_len=cache_len,
            num_copies=copies, use_cache=use_cache,
        )
    else:
        steps = decoder_lm_steps(
            model, params, prompts, lengths, cache_len=cache_len, num_copies=copies,
            use_cache=use_cache,
        )
    step, first_logits = steps.step, steps.logits
    if suppress_ids:
        suppressed = jnp.zeros((model.cfg.vocab_size,), bool).at[jnp.array(suppress_ids)].set(True)
        forbid = lambda logits: jnp.where(suppressed, -jnp.inf, logits)  # noqa: E731

        def step(cache, tokens, _step=steps.step):
            logits, cache = _step(cache, tokens)
            return forbid(logits), cache

        first_logits = forbid(first_logits)
    if strategy == "beam":
        return beam_search(
            step, steps.cache, first_logits, num_beams=num_beams,
            max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            length_penalty=length_penalty, reorder_cache=steps.reorder,
        )
    select = greedy_select if strategy == "greedy" else sampling_select(rng, **sampling)
    return decode(
        step, steps.cache, first_logits, select,
        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
    )


def _check_suppress_ids(suppress_ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    """`suppress_ids` as a sorted tuple of distinct ids in [0, vocab_size) (a static argument)."""
    try:
        ids = tuple(sorted({int(i) for i in suppress_ids}))
        ok = all(float(i) == int(i) for i in suppress_ids)
    except (TypeError, ValueError):
        ok = False
    if not ok or any(not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"suppress_ids must be token ids in [0, {vocab_size}), got {suppress_ids!r}")
    if len(ids) == vocab_size:
        raise ValueError(f"suppress_ids={suppress_ids!r} forbids every token")
    return ids
