"""Fused flash attention on TPU: jax's Pallas splash-attention kernel behind our semantics.

`implementation="pallas"` on a TPU runs this; on a GPU it runs `pallas_gpu`. Like that
module, the dispatcher calls two functions: `supports(...)` and `attention(...)`, whose
signature equals `pallas_gpu.attention`'s. On CPU the same kernel runs in Pallas interpret
mode, which is how the tests check it (no TPU was available to measure it).

How our semantics map onto splash attention (jax.experimental.pallas.ops.tpu.splash_attention):
  * causal / local window -> a static CausalMask / LocalMask / FullMask (splash skips
    blocks the mask hides, forward and backward);
  * segment ids -> splash's SegmentIds; sequence lengths are folded into them: query and
    key positions past their length get two sentinel ids that match nothing else;
  * GQA/MQA -> the kernel's own grouping (K/V are not repeated);
  * the scale multiplies q before the kernel (splash applies none); the soft-cap is
    splash's `attn_logits_soft_cap`, applied to the scaled logits as in our definition;
  * any length: both sequences are padded to a block multiple; padding is masked by the
    sentinel ids;
  * rows with nothing to attend to: splash masks with a large finite negative value, so
    such a row would average every value. Which rows see a key is recomputed here (in
    closed form from the band and the lengths; with segment ids block by block from the
    same rules, O(q_len * kv_len) comparisons and no matmuls) and the others' output set
    to 0, which also zeroes their gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import fused_inputs, masks

SUPPORTED_HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float32)
_LANES = 128  # splash's block sizes must be multiples of the TPU lane width
_DEFAULT_BLOCK = 512  # a common splash tile on v4/v5; not measured here (no TPU)
# Segment ids given to padded positions. They match no other id, provided user segment
# ids stay above -2**31 + 1 (documented in `attention`).
_PAD_Q_ID = np.iinfo(np.int32).min
_PAD_KV_ID = np.iinfo(np.int32).min + 1


def supports(query: jax.Array, key: jax.Array, value: jax.Array, *, bias, mask, dropout_rate: float,
             logits_soft_cap: float | None) -> str | None:
    """None if the splash kernel can serve this call on the default device, else why not."""
    del logits_soft_cap  # supported
    if bias is not None:
        return "the splash kernel takes no dense bias"
    if mask is not None:
        return ("the splash kernel takes no dense mask; express it with is_causal, segment_ids, "
                "local_window_size or sequence lengths")
    if dropout_rate:
        return f"the splash kernel has no attention dropout (dropout_rate={dropout_rate})"
    if jax.default_backend() != "tpu":
        return (f"the splash kernel needs a TPU; the default backend is {jax.default_backend()!r} "
                f"(interpret mode there is for tests only)")
    try:
        _splash_modules()
    except ImportError as e:  # jax may move its bundled kernels; then auto goes elsewhere
        return f"jax {jax.__version__} does not provide the splash kernel here ({e})"
    return _shape_problem(query, key, value)


def _splash_modules():
    """(kernel module, mask module) of jax's bundled splash attention."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask

    return splash_attention_kernel, splash_attention_mask


def _shape_problem(query, key, value) -> str | None:
    return fused_inputs.shape_problem(query, key, value, head_dims=SUPPORTED_HEAD_DIMS, dtypes=DTYPES,
                                      kernel="splash kernel")


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float,
    is_causal: bool,
    query_seq_lengths: jax.Array | None,
    key_value_seq_lengths: jax.Array | None,
    segment_ids: tuple[jax.Array, jax.Array] | None,
    local_window_size: tuple[int, int] | None,
    logits_soft_cap: float | None,
    block_sizes: tuple[int, int] | None,
    interpret: bool | None = None,
) -> jax.Array:
    """Fused attention on TPU; differentiable w.r.t. query, key and value.

    Args: as `pallas_gpu.attention`, except
      block_sizes: (block_q, block_k), multiples of 128, used by the forward and both
        backward kernels; None: up to 512 each, smaller where 512 would pad much more.
      segment_ids: ints above -2**31 + 1 (the two lowest values mark padding).
      interpret: Pallas interpret mode; None means unless the default device is a TPU.
    Returns:
      [batch, q_len, heads, head_dim] in query's dtype; zeros on fully masked rows.
    """
    splash, _ = _splash_modules()
    problem = _shape_problem(query, key, value)
    if problem:
        raise ValueError(problem)
    fused_inputs.check_options(scale, logits_soft_cap, local_window_size)
    batch, q_len, heads, head_dim = query.shape
    kv_len = key.shape[1]
    q_lens = fused_inputs.lengths("query_seq_lengths", query_seq_lengths, batch, q_len)
    kv_lens = fused_inputs.lengths("key_value_seq_lengths", key_value_seq_lengths, batch, kv_len)
    q_ids, kv_ids = fused_inputs.check_segment_ids(segment_ids, batch, q_len, kv_len)
    block_q, block_k = _blocks(block_sizes, q_len, kv_len)
    interpret = jax.devices()[0].platform != "tpu" if interpret is None else bool(interpret)

    q_total, kv_total = q_len + -q_len % block_q, kv_len + -kv_len % block_k
    q_ids = _ids_with_padding(q_ids, q_lens, batch, q_total, _PAD_Q_ID)
    kv_ids = _ids_with_padding(kv_ids, kv_lens, batch, kv_total, _PAD_KV_ID)
    left, right = fused_inputs.band(is_causal, local_window_size)
    kernel = _kernel(heads, q_total, kv_total, left, right, block_q, block_k,
                     None if logits_soft_cap is None else float(logits_soft_cap), interpret)

    def heads_first(x: jax.Array, total: int) -> jax.Array:  # [b, n, h, d] -> [b, h, total, d]
        return fused_inputs.pad_seq(x, total - x.shape[1]).transpose(0, 2, 1, 3)

    q = heads_first((query * scale).astype(query.dtype), q_total)
    k, v = heads_first(key, kv_total), heads_first(value, kv_total)
    out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=splash.SegmentIds(qi, ki)))(
        q, k, v, q_ids, kv_ids)
    out = out.transpose(0, 2, 1, 3)[:, :q_len]
    if segment_ids is None:
        visible = _rows_in_band(q_lens, kv_lens, q_len, left, right)
    else:
        visible = _rows_with_a_visible_key(q_ids, kv_ids, is_causal, local_window_size, block_k)[:, :q_len]
    return jnp.where(visible[:, :, None, None], out, 0).astype(query.dtype)


def _blocks(block_sizes, q_len: int, kv_len: int) -> tuple[int, int]:
    def fit(block: int, length: int) -> int:  # no larger than the length rounded up to a lane multiple
        return min(block, length + -length % _LANES)

    def default(length: int) -> int:
        # Splash skips blocks by the static mask only, so padding costs as much as real
        # tokens: take the largest lane-multiple block up to the default that pads the
        # length no more than 1/8 beyond what 128-wide blocks would.
        least = length + -length % _LANES
        candidates = range(fit(_DEFAULT_BLOCK, length), 0, -_LANES)
        return next(b for b in candidates if length + -length % b <= least + least // 8)

    if block_sizes is None:
        return default(q_len), default(kv_len)
    if not (isinstance(block_sizes, tuple) and len(block_sizes) == 2
            and all(isinstance(b, int) and b > 0 and b % _LANES == 0 for b in block_sizes)):
        raise ValueError(f"block_sizes={block_sizes!r}: the splash kernel takes (block_q, block_k), "
                         f"positive multiples of {_LANES}")
    return fit(block_sizes[0], q_len), fit(block_sizes[1], kv_len)


def _ids_with_padding(ids, lengths, batch: int, total: int, pad_id: int) -> jax.Array:
    """int32 [batch, total]: the segment ids (0 without), `pad_id` at and past each length."""
    ids = jnp.zeros((batch, total), jnp.int32) if ids is None else fused_inputs.pad_seq(ids.astype(jnp.int32),
                                                                                        total - ids.shape[1])
    return jnp.where(jnp.arange(total)[None, :] < lengths[:, None], ids, pad_id)


@functools.lru_cache(maxsize=64)
def _kernel(heads, q_total, kv_total, left, right, block_q, block_k, soft_cap, interpret):
    """The splash kernel for one sequence: (q [h, T, d], k/v [hk, S, d], SegmentIds) -> [h, T, d].

    Cached because building it processes the static mask block by block on the host.
    The kernel holds its mask tables as (concrete) arrays, so it is reusable across traces.
    """
    splash, masks = _splash_modules()
    shape = (q_total, kv_total)
    if left is None and right is None:
        mask = masks.FullMask(shape)
    elif left is None and right == 0:
        mask = masks.CausalMask(shape)
    else:
        mask = masks.LocalMask(shape, window_size=(left, right), offset=0)
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
        block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
        block_q_dq=block_q, block_kv_dq=block_k,
    )
    with jax.ensure_compile_time_eval():  # concrete mask tables even when first built under jit
        return splash.make_splash_mha(
            masks.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
            attn_logits_soft_cap=soft_cap, interpret=interpret,
        )


def _rows_in_band(q_lens, kv_lens, q_len: int, left, right) -> jax.Array:
    """bool [batch, q_len]: without segment ids, row i sees a key iff i < q_len[b] and the
    band [i - left, i + right] meets [0, kv_len[b])."""
    i = jnp.arange(q_len)[None, :]
    lo = jnp.zeros_like(i) if left is None else jnp.maximum(i - left, 0)
    hi = kv_lens[:, None] - 1 if right is None else jnp.minimum(kv_lens[:, None] - 1, i + right)
    return (i < q_lens[:, None]) & (lo <= hi)


def _rows_with_a_visible_key(q_ids, kv_ids, is_causal: bool, window, block_k: int) -> jax.Array:
    """bool [batch, T]: query rows that see at least one key under `masks.allowed` (the
    padding is in the ids), walking the keys `block_k` at a time so no [T, S] array is built."""
    q_pos = jnp.arange(q_ids.shape[1])

    def row_blocks(q_row_ids, k_block_ids, k_pos):
        seq = masks.SequenceInfo(q_ids=q_row_ids, kv_ids=k_block_ids)
        return masks.allowed(q_pos, k_pos, seq, None, is_causal=is_causal, window=window).any(-1)

    def step(seen, start):
        k_ids = jax.lax.dynamic_slice_in_dim(kv_ids, start, block_k, axis=1)
        k_pos = start + jnp.arange(block_k)
        return seen | jax.vmap(row_blocks, in_axes=(0, 0, None))(q_ids, k_ids, k_pos), None

    starts = jnp.arange(0, kv_ids.shape[1], block_k)
    seen, _ = jax.lax.scan(step, jnp.zeros(q_ids.shape, bool), starts)
    return jax.lax.stop_gradient(seen)
