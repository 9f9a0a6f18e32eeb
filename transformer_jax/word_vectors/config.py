"""``WordVectorConfig``: the settings of a word-vector run (the flags of
``train.py --objective cbow|skipgram|glove``), validated when constructed."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

OBJECTIVE_NAMES = ("cbow", "skipgram", "glove")
ROW_UPDATES = ("implicit", "sum", "mean")  # sgns.ROW_RULES (config must not import the JAX code)

# word2vec: twice word2vec's (and gensim's) alpha 0.025, measured: a batch of 1,024 centres
# shares one table state and the implicit row step damps, so 0.025 trailed gensim on
# Shakespeare; 0.05 meets or beats it on both test corpora (benchmarks/RESULTS.md,
# "Word vectors, 2026-12-01 (second)"). GloVe: glove.c's eta.
DEFAULT_LEARNING_RATES = {"cbow": 0.05, "skipgram": 0.05, "glove": 0.05}
WORD2VEC_REFERENCE_BATCH = 1024  # centres per step at which the default rate applies as is


@dataclass(frozen=True)
class WordVectorConfig:
    """A word-vector run.

    objective: "cbow", "skipgram" or "glove".
    dimension: vector width d. window: maximum distance of a context word (word2vec draws
    a window in 1..window per centre; GloVe counts pairs up to it, weighted 1/distance).
    negatives: noise words per positive pair (word2vec). shared_negatives: skip-gram draws
    one set of ``negatives`` per centre for all its context pairs (faster; word2vec draws
    per pair). min_count: rarer words are dropped.
    sample: subsampling threshold (Mikolov's; 0 = off; word2vec only).
    epochs: passes over the corpus (word2vec) or over the co-occurrence entries (GloVe).
    x_max, power: GloVe's weighting f(x) = min(1, (x / x_max)^power).
    learning_rate: initial rate (None: 0.05 for word2vec, times sqrt(batch_size / 1024)
    above 1,024 centres per step, decaying linearly to min_learning_rate as word2vec does;
    0.05 for GloVe's AdaGrad).
    lowercase: lower-case the corpus before tokenising.
    batch_size: centres (word2vec) or co-occurrence entries (GloVe) per step.
    seed: every random draw (initialisation, subsampling, windows, noise, order) follows it.
    data: the corpus for ``transformer_jax.data.load_text`` ("stdlib", "shakespeare", a path).
    log_every, checkpoint_every: in steps.
    row_update: how word2vec's updates of one table row within a batch combine
    ("implicit", "sum" or "mean"; see ``sgns.sgd_update``).
    """

    objective: str = "skipgram"
    dimension: int = 100
    window: int = 5
    negatives: int = 5
    shared_negatives: bool = False
    min_count: int = 5
    sample: float = 1e-3
    epochs: int = 5
    x_max: float = 100.0
    power: float = 0.75
    learning_rate: float | None = None
    min_learning_rate: float = 1e-4
    lowercase: bool = True
    batch_size: int = 1024
    seed: int = 0
    data: str = "stdlib"
    log_every: int = 100
    checkpoint_every: int = 2000
    row_update: str = "implicit"

    def __post_init__(self):
        if self.objective not in OBJECTIVE_NAMES:
            raise ValueError(f"objective={self.objective!r}: expected one of {OBJECTIVE_NAMES}")
        for name in ("dimension", "window", "negatives", "min_count", "epochs", "batch_size",
                     "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if self.row_update not in ROW_UPDATES:
            raise ValueError(f"row_update={self.row_update!r}: expected one of {ROW_UPDATES}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: expected an int >= 0")
        if not isinstance(self.sample, (int, float)) or not 0 <= self.sample < 1:
            raise ValueError(f"sample={self.sample!r}: expected a float in [0, 1) (0 = no subsampling)")
        for name in ("x_max", "power", "min_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r}: expected a positive float")
        if self.learning_rate is not None and (
                not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate!r}: expected a positive float or None")
        for name in ("lowercase", "shared_negatives"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r}: expected a bool")

    @property
    def lr(self) -> float:
        """The initial learning rate: ``learning_rate`` or the objective's default; word2vec's
        default 0.05 grows as ``sqrt(batch_size / 1024)`` above 1,024 centres per step. A
        larger batch takes proportionally fewer sequential steps; the implicit per-row step
        (``sgns.sgd_update``) keeps frequent rows stable at a larger rate, and without it
        batch 16,384 lost most of its quality (benchmarks/RESULTS.md, 2026-12-01)."""
        if self.learning_rate is not None:
            return self.learning_rate
        base = DEFAULT_LEARNING_RATES[self.objective]
        if self.objective == "glove" or self.batch_size <= WORD2VEC_REFERENCE_BATCH:
            return base
        return base * math.sqrt(self.batch_size / WORD2VEC_REFERENCE_BATCH)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WordVectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown word-vector config fields {unknown}")
        return cls(**d)
