"""A training run's metrics on disk: metrics.jsonl, TensorBoard events and loss.png.

`RunLog` appends one JSON record per logged step to `<out_dir>/metrics.jsonl`,
mirrors the numeric fields to TensorBoard (if the optional `tensorboardX` is
installed) and draws `<out_dir>/loss.png` (matplotlib) when closed. In a
multi-process run only process 0 should enable it.
"""
from __future__ import annotations

import json
import os
import warnings


class RunLog:
    """metrics.jsonl + TensorBoard events + loss.png of the run in `out_dir`.

    Args:
      out_dir: the run directory (must exist).
      start_step: the step the run (re)starts from. Records of later steps, left by
        an interrupted run that is now resumed from an older checkpoint, are dropped,
        in metrics.jsonl and in TensorBoard, since the resumed run rewrites them.
      enabled: False makes every method a no-op (the other processes of a run).
    """

    def __init__(self, out_dir: str, start_step: int, enabled: bool = True):
        self.out_dir, self.enabled = out_dir, enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(out_dir, purge_step=start_step + 1)
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard events", stacklevel=2)

    def write(self, record: dict) -> None:
        """Append `record` (JSON-serialisable, with an int "step") to metrics.jsonl, and its
        int/float fields other than "step" to TensorBoard as scalars at that step."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush TensorBoard and draw loss.png from every record in metrics.jsonl."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        plot_losses(read_jsonl(self.path), os.path.join(self.out_dir, "loss.png"))

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file, skipping blank lines; [] if it does not exist
    (see run_dir.read_jsonl: a cut last line is dropped with a warning, other damage is a
    one-line ValueError naming the file)."""
    from transformer_jax import run_dir
    return run_dir.read_jsonl(path, "metrics")


def plot_losses(records: list[dict], path: str) -> None:
    """Save a plot of the "train_loss" and "val_loss" fields of `records` against "step"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("train_loss", "val_loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key.replace("_", " "), marker="." if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
