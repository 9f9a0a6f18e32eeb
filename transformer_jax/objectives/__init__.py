"""Training objectives, each defined once: its batch keys, its loss, its model and data.

An `Objective` (base.py) names the keys of its batches and which of them hold token ids,
its loss (`loss(model, params, batch, *, label_smoothing, **apply_kwargs) -> (sum,
weight)`), and `build_task(TaskInputs) -> (Task, ModelConfig, Tokenizer)`, which makes
the model, the deterministic batch of every step, the fixed validation batches and the
final demonstration (`Task.show`). `register_objective` makes it known by name to
`TrainConfig.objective`, `train` and `train.py --objective`.

Built in, one module each: clm (DecoderLM), mlm (MaskedLM), seq2seq (EncoderDecoder),
classify (SequenceClassifier).

Adding an objective (say "skipgram"):
  1. Write `transformer_jax/objectives/skipgram.py`: a `loss` and a `build_task` (reuse
     `common.py`: `load_token_splits`, `make_tokenizer`, `accuracy`), then
     `SKIPGRAM = register_objective(Objective(name="skipgram", ...))`.
  2. Import it below, so it registers with the package.
  3. Settings of its own become `TrainConfig` fields (train_config.py) and, for the
     command line, flags in train.py's `add_train_flags`; `build_task` reads them from
     `inputs.config`.
  4. Test it in `tests/test_objectives.py` (loss against a NumPy reference) and with one
     tiny `train()` run.
"""
# isort: off  (registration order is the order --help lists them)
from transformer_jax.objectives import clm, mlm, seq2seq, classify  # noqa: F401
# isort: on
from transformer_jax.objectives.base import (
    Objective,
    Task,
    TaskInputs,
    get_objective,
    objective_names,
    register_objective,
)

__all__ = ["Objective", "Task", "TaskInputs", "get_objective", "objective_names", "register_objective"]
