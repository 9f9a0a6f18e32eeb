"""Pass-through to `jax.nn.dot_product_attention` ("xla" and "cudnn")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.attention import masks
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


def attend(ops: Operands, opts: Options, implementation: str) -> tuple[jax.Array, jax.Array | None]:
    """jax.nn.dot_product_attention, with rows that can attend to nothing set to zero.

    jax fills masked logits with a large finite negative number, so such a row gets the mean
    of the values. Which rows they are is decided, as in every implementation, by the
    boolean masks, lengths and window alone (`rows_with_a_key`), never by the bias's
    values; the log-sum-exp is asked of jax only when the caller wants it.
    Returns (out [B, T, N, d], lse [B, T, N] or None).
    """
    result = _call(ops, opts, implementation, return_residual=opts.return_residual)
    out, lse = result if opts.return_residual else (result, None)
    has_key = rows_with_a_key(ops, opts)
    if has_key is not None:
        out = jnp.where(has_key[..., None], out, jnp.zeros((), out.dtype))
        if lse is not None:
            lse = jnp.where(has_key, lse, jnp.asarray(masks.lowest(lse.dtype), lse.dtype))
    return out, lse


def rows_with_a_key(ops: Operands, opts: Options) -> jax.Array | None:
    """bool [B|1, T, N|1]: query rows the masks leave at least one key; None if every row has one.

    Without a dense mask it is closed form: row i (< q_len[b]) sees the keys
    [i - left, i + right] of [0, min(S, kv_len[b])). With one, the mask's rows are reduced
    (XLA fuses the comparisons into the reduction; no [T, S] array is kept).
    """
    b, t, n, _ = ops.query.shape
    s = ops.key.shape[1]
    left, right = opts.window if opts.window is not None else (None, None)
    if opts.is_causal:
        right = 0 if right is None else min(right, 0)
    if ops.mask is None and left is None and right is None and ops.seq.kv_len is None:
        return None  # q_len padding is zeroed by jax itself; s >= 1 here
    i = jnp.arange(t, dtype=jnp.int32)
    if ops.mask is None:
        kv_len = jnp.full((1,), s, jnp.int32) if ops.seq.kv_len is None else jnp.minimum(ops.seq.kv_len, s)
        lo = jnp.zeros_like(i) if left is None else jnp.maximum(i - left, 0)
        hi = kv_len[:, None] - 1 if right is None else jnp.minimum(kv_len[:, None] - 1, i + right)
        rows = lo <= hi  # [B|1, T]
        if ops.seq.q_len is not None:
            rows = rows & (i < ops.seq.q_len[:, None])
        return rows[:, :, None]
    seq = ops.seq

    def per_row_set(mask_bn, q_len, kv_len):  # mask [T|1, S|1] -> [T]
        info = masks.SequenceInfo(q_len=q_len, kv_len=kv_len)
        keep = masks.allowed(i, jnp.arange(s, dtype=jnp.int32), info, mask_bn,
                             is_causal=opts.is_causal, window=opts.window)
        return keep.any(-1)

    mask = ops.mask  # [B|1, N|1, T|1, S|1]
    lengths = (seq.q_len, seq.kv_len)
    per_head = jax.vmap(per_row_set, in_axes=(0, None, None))  # over N|1
    if mask.shape[0] == 1 and seq.q_len is None and seq.kv_len is None:
        rows = per_head(mask[0], None, None)[None]  # [1, N|1, T]
    else:
        rows = jax.vmap(per_head, in_axes=(0 if mask.shape[0] == b else None,
                                           None if seq.q_len is None else 0,
                                           None if seq.kv_len is None else 0))(
            mask if mask.shape[0] == b else mask[0], *lengths)
        rows = jnp.broadcast_to(rows, (b, *rows.shape[1:]))
    return rows.transpose(0, 2, 1)  # [B|1, T, N|1]


def _call(ops, opts, implementation, return_residual=False):
    return jax.nn.dot_product_attention(
        ops.query, ops.key, ops.value, ops.bias, ops.mask,
        scale=opts.scale, is_causal=opts.is_causal,
        query_seq_lengths=ops.seq.q_len, key_value_seq_lengths=ops.seq.kv_len,
        local_window_size=opts.window, implementation=implementation,
        return_residual=return_residual,
    )
