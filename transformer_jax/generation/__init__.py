"""Text generation: greedy decoding, sampling and beam search over the KV cache.

`generate(model, params, prompts, ...)` is the entry point. Modules, one idea each:
  api.py          generate: validation, prefill, the jit-compiled decoding loop
  validate.py     checks on generate's inputs, before compiling
  model_steps.py  DecoderLM / EncoderDecoder as step functions (cached or not)
  interface.py    the step-function contract and `GenerateOutput`
  processors.py   temperature, top-k, top-p on logits
  loop.py         greedy / sampled decoding loop with early stop at EOS
  beam.py         beam search with length penalty
  windowed.py     generate_windowed / generate_text: sliding windows beyond the context
"""
from transformer_jax.generation.api import generate
from transformer_jax.generation.beam import beam_search
from transformer_jax.generation.interface import GenerateOutput
from transformer_jax.generation.loop import decode, greedy_select, sampling_select
from transformer_jax.generation.windowed import generate_text, generate_windowed
from transformer_jax.generation.processors import (
    apply_temperature,
    process_logits,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GenerateOutput",
    "apply_temperature",
    "beam_search",
    "decode",
    "generate",
    "generate_text",
    "generate_windowed",
    "greedy_select",
    "process_logits",
    "sampling_select",
    "top_k_filter",
    "top_p_filter",
]
