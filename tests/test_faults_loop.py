"""Fault injection into the run API (issue 12): `transformer_jax.train` keeps the rules of
transformer_jax/run_dir.py, checkpoint.py and the loop. In-process, tiny preset, CPU; one
short training (stopped by a SIGTERM) is shared by the tests that need a run, and every
other test stops before training. Slow CLI variants of these (kill -9 loops, a tmpfs
disk, a missing peer) are left to the adversarial scripts of the issue.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import train as train_cli
from processes import REPO, cpu_env
from transformer_jax import TrainConfig, checkpoint, load_run, run_dir, run_log, sharding, train
from transformer_jax.run import loop

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]


def _config(corpus, out_dir, **overrides):
    fields = dict(preset="tiny", data=str(corpus), out_dir=str(out_dir), mesh="none", batch_size=4,
                  seq_len=16, max_steps=1000, eval_every=1000, eval_batches=2, log_every=1,
                  checkpoint_every=1000, sample_tokens=0, compile_cache=False)
    return TrainConfig(**{**fields, **overrides})


def _tree(root):
    """Every path under `root` with its bytes (None for folders)."""
    out = {}
    for base, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), root)] = None
        for f in files:
            with open(os.path.join(base, f), "rb") as fh:
                out[os.path.relpath(os.path.join(base, f), root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(np.random.default_rng(0).choice(WORDS, size=3000)) + "\n")
    return path


@pytest.fixture(scope="module")
def stopped_run(corpus, tmp_path_factory):
    """A run that a SIGTERM stops while step 3 is logged (checkpoints every 2 steps, so only
    the signal's own save can keep step 3): (out_dir, TrainResult, what it said)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    original, said = run_log.RunLog.write, []

    def write(self, record):
        if record["step"] == 3:
            signal.raise_signal(signal.SIGTERM)  # arrives after the step, while it is logged
        return original(self, record)

    run_log.RunLog.write = write
    try:
        result = train(_config(corpus, out, checkpoint_every=2), say=said.append)
    finally:
        run_log.RunLog.write = original
    return out, result, said


def _copy(stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run[0], out)
    return out


# ------------------------------------------------------------------ 5: a stop signal


def test_sigterm_while_logging_saves_that_step_and_says_so_truthfully(stopped_run):
    out, result, said = stopped_run
    assert result.stopped_by == "SIGTERM" and result.step == 3
    assert [s for s in said if "SIGTERM" in s] == ["SIGTERM received: saved step 3, exiting"]
    with checkpoint.Checkpointer(str(out / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [2, 3]  # what it said is on disk
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not (out / "run.lock").exists()  # the lock is released on exit


class _Saver:
    """A Checkpointer's save outcome as `loop._say_saved` sees it (latest step on disk, or
    the error the pending save raises)."""

    def __init__(self, latest, error=None):
        self.latest, self.error = latest, error

    def wait(self):
        if self.error is not None:
            raise self.error

    def latest_step(self):
        return self.latest


def test_a_stop_signal_says_saved_only_when_the_step_is_on_disk():
    said = []
    loop._say_saved(_Saver(5), "SIGTERM", 5, said.append)
    loop._say_saved(_Saver(3), "SIGINT", 5, said.append)
    with pytest.raises(OSError, match="No space"):
        loop._say_saved(_Saver(3, OSError(errno.ENOSPC, "No space left on device")), "SIGTERM", 5,
                        said.append)
    assert said == ["SIGTERM received: saved step 5, exiting",
                    "SIGINT received: could not save step 5; the latest checkpoint is step 3, exiting",
                    "SIGTERM received: could not save step 5 ([Errno 28] No space left on device); "
                    "the latest checkpoint is step 3, exiting"]


# ------------------------------------------------------------------ 1, 2: the out-dir rules


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_and_left_unchanged(corpus, tmp_path, overwrite):
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "my_code.py").write_text("print('mine')\n")
    before = _tree(tmp_path)
    with pytest.raises(run_dir.RunDirError, match="is not empty and holds no run"):
        train(_config(corpus, tmp_path, overwrite=overwrite))
    assert _tree(tmp_path) == before


def test_a_run_that_lost_its_config_is_an_error_not_a_fresh_start(stopped_run, corpus, tmp_path):
    out = _copy(stopped_run, tmp_path)
    (out / "config.json").unlink()
    before = _tree(out)
    with pytest.raises(run_dir.RunDirError, match="holds checkpoints but no config.json"):
        train(_config(corpus, out))
    assert _tree(out) == before  # checkpoints kept


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_truncated_run_file_is_one_line_naming_it(stopped_run, corpus, tmp_path, name):
    out = _copy(stopped_run, tmp_path)
    text = (out / name).read_text()
    (out / name).write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match="truncated") as info:
        train(_config(corpus, out))
    assert str(out / name) in str(info.value) and "\n" not in str(info.value)


def test_metrics_with_a_cut_last_line_or_a_damaged_one(tmp_path):
    good = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 3, "train_lo')
    with pytest.warns(UserWarning, match="incomplete last line 3"):
        log = run_log.RunLog(str(tmp_path), start_step=2)
    log.tb = None  # TensorBoard is not what this checks
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == good
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}' line 2 is not valid JSON"):
        run_log.RunLog(str(tmp_path), start_step=3)


# ------------------------------------------------------------------ 3, 4, 13: damaged checkpoints


def _truncate_params(step_dir):
    for root, _, files in os.walk(step_dir / "params"):
        for name in files:
            os.truncate(os.path.join(root, name), 0)


def test_load_run_falls_back_from_a_truncated_checkpoint_and_renames_nothing(stopped_run, tmp_path):
    out = _copy(stopped_run, tmp_path)
    with checkpoint.Checkpointer(str(out / "checkpoints")) as ckpt:
        want = ckpt.restore_params(2)
    _truncate_params(out / "checkpoints" / "3")
    before = sorted(os.listdir(out / "checkpoints"))
    with pytest.warns(UserWarning, match="step 3 .*damaged"):
        run = load_run(str(out))
    assert run.step == 2
    for got, expected in zip(jax.tree.leaves(run.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), expected)
    assert sorted(os.listdir(out / "checkpoints")) == before


def test_no_readable_checkpoint_is_an_error_now_and_on_the_next_run(stopped_run, corpus, tmp_path):
    out = _copy(stopped_run, tmp_path)
    for step in (2, 3):
        _truncate_params(out / "checkpoints" / str(step))
    for _ in range(2):  # never a silent restart from step 0
        with pytest.raises(checkpoint.NoReadableCheckpointError, match="no readable checkpoint"):
            train(_config(corpus, out, max_steps=6))
    assert sorted(n.split(".")[0] for n in os.listdir(out / "checkpoints")) == ["2", "3"]  # set aside, kept
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# ------------------------------------------------------------------ 6, 7: one writer, a full disk


HOLD_LOCK = """
import sys
from transformer_jax import run_dir
with run_dir.RunLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_fails_naming_the_holder_and_changes_nothing(stopped_run, corpus, tmp_path):
    out = _copy(stopped_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=cpu_env(), cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(out)
        for overwrite in (False, True):  # resuming it, or replacing it
            with pytest.raises(run_dir.RunLockedError, match=f"pid {holder.pid}"):
                train(_config(corpus, out, max_steps=6, overwrite=overwrite))
            assert _tree(out) == before
    finally:
        holder.communicate("", timeout=60)
    assert not (out / "run.lock").exists()


def test_a_full_disk_in_the_run_is_one_error_naming_the_directory(stopped_run, corpus, tmp_path,
                                                                   monkeypatch):
    out = _copy(stopped_run, tmp_path)

    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(run_dir, "write_atomic", no_space)  # config.json's rewrite on resume
    with pytest.raises(run_dir.DiskFullError, match=f"disk full: .* holding {out} while training"):
        train(_config(corpus, out, max_steps=6))
    assert not (out / "run.lock").exists()


DISK_FULL_AT_CONFIG = """
import errno, runpy, sys
from transformer_jax import run_dir

def no_space(path, text):
    raise OSError(errno.ENOSPC, "No space left on device", path)

run_dir.write_atomic = no_space
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_the_cli_prints_a_full_disk_as_one_line(stopped_run, corpus, tmp_path):
    out = _copy(stopped_run, tmp_path)
    flags = ["--preset", "tiny", "--data", str(corpus), "--out-dir", str(out), "--mesh", "none",
             "--batch-size", "4", "--seq-len", "16", "--max-steps", "6", "--eval-every", "1000",
             "--eval-batches", "2", "--log-every", "1", "--checkpoint-every", "2", "--sample-tokens", "0"]
    result = subprocess.run([sys.executable, "-c", DISK_FULL_AT_CONFIG, *flags], env=cpu_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1] == (f"train.py: error: [Errno 28] disk full: no space left on the device holding "
                         f"{out} while training"), result.stderr[-3000:]


# ------------------------------------------------------------------ 10, 11: checked up front


@pytest.mark.parametrize("rows, expected", [
    ("abc\tcba\n\tx\n", "row 2: empty source"),
    ("abc\tcba\n" + "a" * 40 + "\tx\n", "row 2: source of 40 tokens > 16"),
])
def test_seq2seq_pairs_that_do_not_fit_fail_before_training(tmp_path, rows, expected):
    data = tmp_path / "pairs.tsv"
    data.write_text(rows * 10)
    config = TrainConfig(objective="seq2seq", preset="tiny", data=str(data), out_dir=str(tmp_path / "run"),
                         mesh="none", seq_len=16, max_steps=3, compile_cache=False)
    with pytest.raises(ValueError, match=expected) as info:
        train(config)
    assert f"--data {data}" in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("rope_base", float("nan")), ("layer_norm_eps", float("nan")),
                                          ("layer_norm_eps", float("inf"))])
def test_non_finite_model_settings_are_rejected_before_anything_runs(corpus, tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        train(_config(corpus, tmp_path / "run", model={field: value}))
    assert not (tmp_path / "run").exists()


def test_the_distributed_timeout_is_a_checked_setting_and_flag_that_train_passes_on(monkeypatch):
    assert TrainConfig().distributed_timeout_s == 300.0
    args = train_cli.build_parser().parse_args(["--distributed-timeout", "5"])
    assert train_cli.config_from_args(args).distributed_timeout_s == 5.0
    seen = []

    class Stop(Exception):
        pass

    def initialize(*args, timeout_s=None):
        seen.append(timeout_s)
        raise Stop  # only what train passes on matters here

    monkeypatch.setattr(sharding, "initialize_distributed", initialize)
    with pytest.raises(Stop):
        train(TrainConfig(distributed_timeout_s=7.5))
    assert seen == [7.5]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="distributed_timeout_s"):
            TrainConfig(distributed_timeout_s=bad)
