"""A run's files: RunLog (metrics.jsonl, TensorBoard, loss.png)."""
import json
import os

from transformer_jax.run_log import RunLog, read_jsonl


def _records(steps):
    return [{"step": s, "train_loss": 3.0 / s, "lr": 1e-3} for s in steps]


def test_records_round_trip_and_plot(tmp_path):
    with RunLog(str(tmp_path), start_step=0) as log:
        for record in _records([1, 2, 3]) + [{"step": 4, "train_loss": 0.5, "val_loss": 0.7}]:
            log.write(record)
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == _records([1, 2, 3]) + [
        {"step": 4, "train_loss": 0.5, "val_loss": 0.7}]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))


def test_resume_drops_records_after_the_restored_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _records([2, 4, 6, 8])) + "\n")
    log = RunLog(str(tmp_path), start_step=4)  # an interrupted run resumed from step 4
    log.write(_records([6])[0] | {"train_loss": 9.0})
    log.close()
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == _records([2, 4]) + [
        {"step": 6, "train_loss": 9.0, "lr": 1e-3}]


def test_disabled_log_writes_nothing(tmp_path):
    log = RunLog(str(tmp_path), start_step=0, enabled=False)
    log.write(_records([1])[0])
    log.close()
    assert os.listdir(tmp_path) == []
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == []
