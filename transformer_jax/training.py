"""Losses, optimizer, train state and the train step, for every objective.

Everything here is a pure function of its inputs, so a train step is a function of
(state, batch) alone: the dropout key is derived from (seed, step) with
`jax.random.fold_in`, which is what makes a resumed run bit-identical. Evaluation is
`jax.jit(make_loss_fn(...))` (no dropout), summed over batches, then divided.

Batches are dicts of arrays whose leading axis is the batch; each objective
(`transformer_jax.objectives`) names its keys and defines its loss.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# Parameters whose path mentions one of these are not weight-decayed (biases, norm
# scales, token/position embeddings), as in GPT-2 and BERT.
_NO_DECAY = re.compile(r"bias|scale|norm|embed", re.IGNORECASE)

LossFn = Callable[..., tuple[jax.Array, jax.Array]]

# Dense bf16 peak FLOP/s per device (vendor data sheets), for model FLOPs utilisation.
# Matched in order against jax's device_kind, so the specific names come first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a pytree, so it jits and checkpoints.

    step: int32 scalar, number of completed optimizer steps (also the data position).
    params: the model parameters (float32).
    opt_state: the optax state for `params`.
    rng: uint32[2] base key; step `s` uses `fold_in(rng, s)` for dropout.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


# --------------------------------------------------------------------------- losses


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Weighted softmax cross-entropy, summed (not averaged) so that sums can be accumulated.

    Args:
      logits: [..., vocab] float; cast to float32.
      targets: [...] int class ids.
      weights: [...] (bool or float) per-position weights; None = all ones.
      label_smoothing: eps in [0, 1): the target distribution is (1-eps) one-hot
        + eps uniform over the vocabulary.
    Returns:
      (sum of weight * loss, sum of weights), both float32 scalars.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: targets.shape={targets.shape} must equal logits.shape[:-1]="
            f"{logits.shape[:-1]}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r}: expected a value in [0, 1)")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    weights = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def make_loss_fn(model: nn.Module, objective: Any, *, label_smoothing: float = 0.0) -> LossFn:
    """The loss of `model` on one batch of `objective` (a registered name such as "clm",
    or an `objectives.Objective`, which defines its batch keys and loss).

    Returns `loss_fn(params, batch, dropout_rng=None) -> (loss_sum, weight_sum)`;
    dropout is on exactly when `dropout_rng` is given.
    """
    # The objectives sit above this module (they build models and data); looked up lazily.
    from transformer_jax.objectives import get_objective

    objective_loss = get_objective(objective).loss

    def loss_fn(params, batch, dropout_rng=None):
        kwargs = {"deterministic": dropout_rng is None}
        if dropout_rng is not None:
            kwargs["rngs"] = {"dropout": dropout_rng}
        return objective_loss(model, params, batch, label_smoothing=label_smoothing, **kwargs)

    return loss_fn


# ----------------------------------------------------------------------- optimizer


def param_path(path: tuple) -> str:
    """'encoder/layers_0/attn/query/kernel' for a key path into a params dict.

    Only dict keys count, so the path is the same for plain and
    LogicallyPartitioned-boxed parameters.
    """
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_labels(params: Any, freeze: str | None = None) -> Any:
    """A tree like `params`: "frozen" where every element is frozen by regex `freeze` (see
    `frozen_layers`), else "trainable" (including scanned stacks frozen only in part)."""
    masks = frozen_layers(params, freeze)
    return jax.tree.map(lambda m: "frozen" if np.all(m) else "trainable", masks)


def frozen_layers(params: Any, freeze: str | None = None) -> Any:
    """A tree like `params` of numpy bools: which parts of each leaf regex `freeze` freezes.

    A leaf is frozen when `freeze` matches its path (`param_path`). A leaf of a scanned
    layer stack (a path component "layers", leading axis = layer) gets one bool per layer,
    shaped [num_layers, 1, ...] to broadcast against it: layer i is frozen when `freeze`
    matches the stack's path or the path with "layers" spelled "layer_<i>", as in the
    unscanned stack, so `blocks/layer_[0-5]/` freezes the same layers either way.
    Other leaves get a scalar.
    """
    pattern = _compile_freeze(freeze)

    def mask(path, leaf):
        name = param_path(path)
        whole = bool(pattern and pattern.search(name))
        parts = name.split("/")
        if pattern is None or "layers" not in parts or not leaf.shape:
            return np.asarray(whole)
        i = parts.index("layers")
        layer_names = ("/".join([*parts[:i], f"layer_{n}", *parts[i + 1:]]) for n in range(leaf.shape[0]))
        per_layer = [whole or bool(pattern.search(layer_name)) for layer_name in layer_names]
        return np.asarray(per_layer).reshape((-1,) + (1,) * (len(leaf.shape) - 1))

    return jax.tree_util.tree_map_with_path(mask, params)


def _zero_frozen_layers(freeze: str) -> optax.GradientTransformation:
    """Zeroes the updates of the layers `freeze` selects inside scanned stacks (whole frozen
    leaves never reach this transformation: multi_transform routes them to set_to_zero)."""

    def update_fn(updates, state, params=None):
        del params
        masks = frozen_layers(updates, freeze)
        return jax.tree.map(lambda u, m: u if not m.any() else jnp.where(m, jnp.zeros_like(u), u),
                            updates, masks), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def decay_mask(params: Any) -> Any:
    """A tree of bools like `params`: True where weight decay applies (weight matrices only)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not _NO_DECAY.search(param_path(path)), params
    )


def make_schedule(
    learning_rate: float, *, warmup_steps: int, total_steps: int, final_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
    `final_ratio * learning_rate` at `total_steps`."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r}: expected a positive number")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps!r}: expected 0 <= warmup_steps < total_steps={total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=learning_rate * final_ratio,
    )


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    freeze: str | None = None,
) -> optax.GradientTransformation:
    """AdamW with decay masked off biases/norms/embeddings, global-norm clipping, and freezing.

    Parameters whose path matches regex `freeze` get zero updates and no optimizer
    moments (optax.multi_transform); clipping sees only the trainable gradients. Layers
    of a scanned stack can be frozen one by one (see `frozen_layers`); they keep their
    slice of the stack's optimizer moments, at zero.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r}: expected >= 0")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip={grad_clip!r}: expected a positive number or None")
    _compile_freeze(freeze)
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    trainable = optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw
    if freeze is None:
        return trainable
    # Frozen layers of a scanned stack share their leaves with trainable ones: zero their
    # gradients before clipping (so the norm sees trainable values only) and their updates
    # after AdamW (whose weight decay would move them).
    layers_masked = optax.chain(_zero_frozen_layers(freeze), trainable, _zero_frozen_layers(freeze))
    return optax.multi_transform(
        {"trainable": layers_masked, "frozen": optax.set_to_zero()},
        lambda params: param_labels(params, freeze),
    )


def _compile_freeze(freeze: str | None) -> re.Pattern | None:
    if freeze is None:
        return None
    try:
        return re.compile(freeze)
    except re.error as e:
        raise ValueError(f"freeze={freeze!r}: not a valid regular expression ({e})") from None


# ---------------------------------------------------------------------- train state


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_args: tuple,
    *,
    seed: int,
    init_kwargs: dict | None = None,
    unbox: bool = True,
) -> TrainState:
    """Initialise parameters (from `model.init(*init_args)`) and the optimizer state.

    Traceable, so `jax.eval_shape(lambda: init_train_state(..., unbox=False))` gives
    the abstract state with flax LogicallyPartitioned boxes kept on the parameters
    (and on the optimizer moments, which mirror them) for computing shardings; the
    state to train with uses `unbox=True` (plain arrays).
    """
    param_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init({"params": param_key}, *init_args, **(init_kwargs or {}))["params"]
    if unbox:
        params = nn.meta.unbox(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_key
    )


# ------------------------------------------------------------------------- steps


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, *, accum_steps: int = 1
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A pure train step `(state, batch) -> (new_state, metrics)`; jit it with donate_argnums=0.

    The batch (leading axis b, divisible by `accum_steps`) is split into
    `accum_steps` micro-batches scanned in sequence; the summed gradient is divided
    by the total weight, so the update equals that of one b-row batch.
    A non-finite loss or gradient leaves params and optimizer state unchanged (the
    step counter still advances, past the bad batch); the caller decides from
    metrics["finite"] whether to stop or carry on.

    metrics: loss (float32 mean over weights), grad_norm, finite (bool), weight
    (float32, e.g. number of target tokens).
    """
    if not (isinstance(accum_steps, int) and accum_steps >= 1):
        raise ValueError(f"accum_steps={accum_steps!r}: expected a positive int")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        micro = jax.tree.map(lambda x: _split_micro(x, accum_steps), batch)
        step_key = jax.random.fold_in(state.rng, state.step)

        def accumulate(carry, xs):
            index, micro_batch = xs
            (loss_sum, weight_sum), grads = grad_fn(
                state.params, micro_batch, jax.random.fold_in(step_key, index)
            )
            g_acc, l_acc, w_acc = carry
            return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss_sum, w_acc + weight_sum), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, weight), _ = jax.lax.scan(
            accumulate, init, (jnp.arange(accum_steps), micro)
        )
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A conditional rather than a select between old and new values: XLA then updates the
        # (donated) parameters and moments in place instead of copying every leaf first.
        params, opt_state = jax.lax.cond(finite, update, lambda params, opt_state: (params, opt_state),
                                         state.params, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "weight": weight}
        return new_state, metrics

    return train_step


def _split_micro(x: jax.Array, accum_steps: int) -> jax.Array:
    if x.shape[0] % accum_steps:
        raise ValueError(
            f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}"
        )
    # Micro-batch i takes rows i, i+k, i+2k, ...: with the batch sharded in contiguous
    # blocks over devices, every device then feeds every micro-batch (no resharding).
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)


def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak FLOP/s of `device` from PEAK_FLOPS; None for CPUs and unknown kinds."""
    kind = getattr(device, "device_kind", "").lower()
    return next((flops for name, flops in PEAK_FLOPS if name.lower() in kind), None)
