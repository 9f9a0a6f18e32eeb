"""Pass-through to `jax.nn.dot_product_attention` ("xla" and "cudnn")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.attention.arguments import Operands, Options


def unsupported_reason(ops: Operands, opts: Options, implementation: str) -> str | None:
    """None if jax.nn's `implementation` can serve this call here, else why not."""
    missing = [
        name
        for name, used in (
            ("segment_ids", ops.seq.q_ids is not None),
            ("logits_soft_cap", opts.logits_soft_cap is not None),
            ("dropout", opts.dropout_rate > 0),
            ("precision", opts.precision is not None),
            ("block_sizes", opts.block_sizes is not None),
        )
        if used
    ]
    if missing:
        return f"jax.nn.dot_product_attention has no {', '.join(missing)}"
    if implementation == "xla":
        return None
    if jax.default_backend() != "gpu":
        return f"cudnn needs a GPU, the default backend is {jax.default_backend()!r}"
    # Let jax itself decide (dtype, head_dim, GPU generation, cuDNN version, window kind).
    try:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ops)
        jax.eval_shape(lambda o: _call(o, opts, "cudnn"), shapes)
    except Exception as e:  # noqa: BLE001 -- any refusal from jax is the reason
        return f"jax.nn cudnn refused the call: {e}"
    return None


def attend(ops: Operands, opts: Options, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention, with fully masked query rows set to zero.

    jax fills masked logits with a large finite negative number, so a row that can attend
    to nothing gets the mean of the values; we zero it (detected from the log-sum-exp,
    which is then near that large negative number) to match the other implementations.
    """
    out, lse = _call(ops, opts, implementation, return_residual=True)
    empty = lse.astype(jnp.float32) < -1e30  # real rows have lse >= max logit
    return jnp.where(empty[..., None], jnp.zeros((), out.dtype), out)


def _call(ops, opts, implementation, return_residual=False):
    return jax.nn.dot_product_attention(
        ops.query, ops.key, ops.value, ops.bias, ops.mask,
        scale=opts.scale, is_causal=opts.is_causal,
        query_seq_lengths=ops.seq.q_len, key_value_seq_lengths=ops.seq.kv_len,
        local_window_size=opts.window, implementation=implementation,
        return_residual=return_residual,
    )

