"""Residual transformer blocks and the layer stack (plain loop, `nn.scan`, `nn.remat`)."""
from __future__ import annotations

import flax.linen as nn
import jax

from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init
from transformer_jax.layers.attention import MultiHeadAttention
from transformer_jax.layers.feedforward import FeedForward
from transformer_jax.layers.norms import make_norm

REMAT_POLICY_FNS = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute the block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

ACTIVATION_AXES = ("batch", "length", "embed")


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual branch.

    Pre-norm: x + drop(f(norm(x))). Post-norm: norm(x + drop(f(x))).
    `deterministic` and `decode` are attributes (static) so that `nn.remat` and
    `nn.scan` see only arrays as arguments.
    """

    cfg: ModelConfig
    num_layers: int  # depth of the stack, for the residual init scale
    causal: bool = False
    cross: bool = False
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array | None,
        self_mask: jax.Array | None,
        cross_mask: jax.Array | None,
        positions: jax.Array | None,
        segment_ids: jax.Array | None,
        valid: jax.Array | None,
    ) -> jax.Array:
        """x: [b, t, d_model] -> [b, t, d_model]; see `BlockStack` for the arguments."""
        cfg = self.cfg
        out_std = init.residual_std(self.num_layers)
        flags = dict(deterministic=self.deterministic, decode=self.decode)

        def residual(y: jax.Array, branch, name: str) -> jax.Array:
            norm = make_norm(cfg, f"{name}_norm")
            dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
            if cfg.norm_position == "pre":
                return y + dropout(branch(norm(y)))
            return norm(y + dropout(branch(y)))

        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        self_attn = MultiHeadAttention(cfg, causal=self.causal, out_std=out_std, name="self_attn")
        x = residual(
            x,
            lambda h: self_attn(h, mask=self_mask, positions=positions, segment_ids=segment_ids,
                                valid=valid, **flags),
            "self_attn",
        )
        if self.cross:
            cross_attn = MultiHeadAttention(cfg, out_std=out_std, name="cross_attn")
            x = residual(
                x, lambda h: cross_attn(h, encoded, mask=cross_mask, positions=positions, **flags), "cross_attn"
            )
        x = residual(x, FeedForward(cfg, out_std=out_std, name="mlp"), "mlp")
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class BlockStack(nn.Module):
    """`num_layers` Blocks, looped (params `layer_0`, `layer_1`, ...) or scanned
    (`cfg.scan_layers`: one `layers` subtree whose params have a leading "layers" axis),
    each optionally rematerialised with `cfg.remat_policy`. Same outputs either way.
    """

    cfg: ModelConfig
    num_layers: int
    causal: bool = False
    cross: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array | None = None,
        self_mask: jax.Array | None = None,
        cross_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        valid: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """x: [b, t, d_model] in cfg.dtype -> same.

        encoded: [b, s, d_model] for cross-attention. self_mask / cross_mask: bool,
        broadcastable to [b, heads, t, t] / [b, heads, t, s]. positions, segment_ids: int
        [b, t]. valid: bool [b, t] (decode only).
        """
        cfg = self.cfg
        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=REMAT_POLICY_FNS[cfg.remat_policy], prevent_cse=not cfg.scan_layers)

        def make(name: str) -> Block:
            return block(cfg, self.num_layers, causal=self.causal, cross=self.cross,
                         deterministic=deterministic, decode=decode, name=name)

        args = (encoded, self_mask, cross_mask, positions, segment_ids, valid)
        if not cfg.scan_layers:
            for i in range(self.num_layers):
                x = make(f"layer_{i}")(x, *args)
            return x

        def body(layer: Block, carry: jax.Array, *args):
            return layer(carry, *args), None

        scanned = nn.scan(
            body,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(make("layers"), x, *args)
        return x
