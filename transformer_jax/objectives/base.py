"""What an objective is (`Objective`), what it builds (`Task`), and the registry of them."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from transformer_jax import models
from transformer_jax.config import ModelConfig

if TYPE_CHECKING:
    from transformer_jax.tokenizers import Tokenizer
    from transformer_jax.train_config import TrainConfig


@dataclasses.dataclass
class Task:
    """One objective's model and data for one run; host batches are dicts of NumPy arrays.

    Attributes:
      model: the Flax module to train.
      init_args: dummy positional inputs of `model.init`.
      train_batch: step -> the global training batch of that step (deterministic).
      val_batches: the fixed validation batches.
      tokens_per_batch: target tokens per global batch, for tokens/s.
      baseline: unigram entropy (nats) of the training tokens, where it is meaningful.
      init_kwargs: keyword inputs of `model.init` besides `init_args`.
      extra: task facts saved in the run's config.json (e.g. label names).
      show: params -> the final sample / demonstration, as text.
    """

    model: Any
    init_args: tuple
    train_batch: Callable[[int], dict]
    val_batches: list[dict]
    tokens_per_batch: int
    baseline: float | None = None
    init_kwargs: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    show: Callable[[Any], str] | None = None


@dataclasses.dataclass(frozen=True)
class TaskInputs:
    """What `Objective.build_task` gets.

    config: the resolved TrainConfig (batch_size, seq_len, seed, eval_batches, data,
      tokenizer, objective-specific fields such as pooling, ...).
    model_config: vocab_size -> the ModelConfig (the vocabulary is the tokenizer's).
    tokenizer: the tokenizer to reuse (a resumed or fine-tuned run), or None to build
      `config.tokenizer` on the data, of at most `vocab_size` symbols (BPE).
    vocab_size: the requested vocabulary of a BPE tokenizer.
    """

    config: TrainConfig
    model_config: Callable[[int], ModelConfig]
    tokenizer: Tokenizer | None
    vocab_size: int = 4096


LossFn = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective, defined once: its batches, its loss and its model.

    Attributes:
      name: the `--objective` value.
      description: one line for `--help`.
      batch_keys: every key of its batches, with the dtype/shape contract in words.
      token_keys: the batch keys that hold token ids (checked against the vocabulary
        before compiling; inside jit a bad id would be clamped silently).
      loss: `loss(model, params, batch, *, label_smoothing, **apply_kwargs) ->
        (loss_sum, weight_sum)`, float32 scalars, summed (not averaged) so they can be
        accumulated over micro-batches and evaluation batches. `apply_kwargs` carries
        `deterministic` and, with dropout, `rngs`.
      build_task: TaskInputs -> (Task, ModelConfig, Tokenizer).
      make_model: (ModelConfig, TrainConfig, task facts) -> its Flax module; how
        `load_run` rebuilds the model of a saved run.
      default_data: `--data` when none is given.
      default_label_smoothing: `--label-smoothing` when none is given.
      perplexity: whether exp(validation loss) means something (a classifier's does not).
      model_kind: the `count_params` kind of its model, for flops_per_token (only
        "decoder_lm" has a FLOP formula); None elsewhere.
    """

    name: str
    description: str
    batch_keys: dict[str, str]
    token_keys: tuple[str, ...]
    loss: LossFn
    build_task: Callable[[TaskInputs], tuple[Task, ModelConfig, Any]]
    make_model: Callable[[ModelConfig, Any, dict], Any]
    default_data: str = "stdlib"
    default_label_smoothing: float = 0.0
    perplexity: bool = True
    model_kind: str | None = None

    def check_batch(self, batch: dict, cfg: ModelConfig) -> None:
        """Raise ValueError unless `batch` has every key of `batch_keys` and its token
        arrays fit `cfg` (ids in [0, vocab_size), lengths within a learned position table)."""
        missing = [k for k in self.batch_keys if k not in batch and not self.batch_keys[k].startswith("optional")]
        if missing:
            raise ValueError(f"a {self.name!r} batch lacks {missing}; it has {sorted(batch)}")
        for key in self.token_keys:
            if key in batch:
                models.check_tokens(np.asarray(batch[key]), cfg, name=f"batch[{key!r}]")


_REGISTRY: dict[str, Objective] = {}


def register_objective(objective: Objective, *, replace: bool = False) -> Objective:
    """Make `objective` available by name (to `train`, `TrainConfig.objective`, --objective)."""
    if not isinstance(objective, Objective):
        raise TypeError(f"objective={objective!r}: expected an Objective")
    if objective.name in _REGISTRY and not replace:
        raise ValueError(f"an objective named {objective.name!r} is already registered")
    _REGISTRY[objective.name] = objective
    return objective


def get_objective(name: str | Objective) -> Objective:
    """The registered objective `name` (an Objective is returned as is)."""
    if isinstance(name, Objective):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"objective={name!r}: expected one of {objective_names()}")
    return _REGISTRY[name]


def objective_names() -> tuple[str, ...]:
    """Names of the registered objectives, in registration order."""
    return tuple(_REGISTRY)
