"""How much temporary memory a training step asks of the host, estimated before anything
compiles (and before JAX starts), so the trainer can choose malloc settings for it
(`run.host_memory`).

XLA's CPU runtime packs a step's temporaries into one buffer
(`compiled.memory_analysis().temp_size_in_bytes`). For a pre-norm decoder LM trained with
AdamW it is, in elements of the compute dtype, close to

    layers * (10.6 T*d_model + 2.1 T*d_ff + 1.2 B*heads*S*S + 0.85 layer_params)
    + 3.4 T*vocab + 1.5 vocab*d_model,                              T = B*S tokens,

a least-squares fit of the relative error over 25 shapes (d_model 64-384, 1-8 layers, 2-8
heads, B 2-64, S 32-256, vocab 60-5000, no dropout; jax 0.10.2): within 17% of every one,
and of 20 random others with at least 512 tokens a step (0.88-1.16). Under that the
optimiser's share varies more: up to 31% over, on buffers of a few MiB.
`train`'s own steps at 2 x 128 wide layers with dropout 0.2 and 16 x 64 tokens are larger
by dropout's masks, which are not counted; an encoder-decoder counts both stacks at
`seq_len`, though a task's sequences may be shorter (the `reverse` task's are). Enough for
`run.host_memory`, which needs only which side of 32 MiB a step falls on.
"""
from __future__ import annotations

import jax.numpy as jnp

from transformer_jax.config import ModelConfig

# elements of the temp buffer per unit of each term of the fit above
_PER_TOKEN_WIDTH, _PER_TOKEN_FF, _PER_SCORE, _PER_LAYER_PARAM = 10.6, 2.1, 1.2, 0.85
_PER_LOGIT, _PER_EMBEDDING_PARAM = 3.4, 1.5


def estimate_step_temp_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, *,
                             encoder_decoder: bool = False) -> int:
    """Estimated bytes of the CPU temp buffer of one training step of `cfg` on a
    [batch_size, seq_len] batch (one device, no gradient accumulation: pass the
    micro-batch's size)."""
    tokens, d = batch_size * seq_len, cfg.d_model
    layers = cfg.num_layers + (cfg.decoder_layers if encoder_decoder else 0)
    per_layer = (_PER_TOKEN_WIDTH * tokens * d + _PER_TOKEN_FF * tokens * cfg.d_ff
                 + _PER_SCORE * batch_size * cfg.num_heads * seq_len * seq_len
                 + _PER_LAYER_PARAM * (4 * d * d + 2 * d * cfg.d_ff))
    elements = layers * per_layer + cfg.vocab_size * (_PER_LOGIT * tokens + _PER_EMBEDDING_PARAM * d)
    return int(elements * jnp.dtype(cfg.dtype).itemsize)
