"""Fault injection into the run API (issue 12): `transformer_jax.train` keeps the rules of
transformer_jax/run_dir.py, checkpoint.py and the loop. In-process, tiny preset, CPU, one
compilation (a persistent cache of this module's own): a chain of short runs, each stopped by
a SIGTERM at one phase of a step and resumed by the next, is checked against an
uninterrupted run; the first of them is shared by the tests that need a run, and every
other test stops before training. Slow CLI variants of these (kill -9 loops, a tmpfs
disk, a missing peer) are left to the adversarial scripts of the issue.
"""
import dataclasses
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
from transformer_jax import stop_signal
from transformer_jax.run import loop

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]


def _config(corpus, out_dir, **overrides):
    # warmup and decay fixed (not derived from max_steps), so runs that stop and resume
    # with other max_steps follow one schedule; dropout, so the rng must resume too
    fields = dict(preset="tiny", data=str(corpus), out_dir=str(out_dir), mesh="none", batch_size=4,
                  seq_len=16, max_steps=1000, eval_every=1000, eval_batches=2, log_every=1,
                  checkpoint_every=1000, sample_tokens=0, warmup_steps=2, decay_steps=16,
                  model={"dropout_rate": 0.1}, compile_cache=True)
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every train() jits fresh closures: a persistent cache (this module's own) turns the
    repeated, identical compilations of its runs into disk reads."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")
    saved = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0, True)):
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


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


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(np.random.default_rng(0).choice(WORDS, size=3000)) + "\n")
    return path


# ------------------------------------------------------------------ 5: a stop signal at every phase

# SIGTERM at each phase of a step, one run per phase, each resuming the one before, so one
# chain of short runs (one compilation) covers them all: (phase, the step during which the
# signal arrives, the resumable settings of that run, the step that must be saved). Every
# stop step but the save phase's is one no periodic checkpoint covers.
PHASES = [
    ("logging", 3, dict(checkpoint_every=2), 3),
    ("batch", 5, dict(checkpoint_every=2), 5),            # while the step's batch is built
    ("train_step", 7, dict(checkpoint_every=2), 7),       # the step dispatched, still computing
    ("evaluation", 9, dict(checkpoint_every=2, eval_every=3), 9),
    ("checkpoint_save", 10, dict(checkpoint_every=2), 10),  # a periodic save in flight
    ("between_steps", 11, dict(checkpoint_every=4, log_every=2), 12),  # step 11 done, 12 not begun
    ("restore", 12, dict(checkpoint_every=4), 13),        # before the first step of the run
]
MAX_STEPS = 16
SAVE_FAILS_AT = 14  # after the chain: a stop whose save fails


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # a real signal; its handler runs at the next bytecode


def _sigterm_during(monkeypatch, phase, at):
    """Deliver SIGTERM once, during `phase` of step `at` (steps counted from 1)."""
    from transformer_jax.run import trainer

    current = {"step": None}  # the step being run, as its batch is asked for
    build_task, compile_run = trainer.build_task, trainer.compile_run

    def wrapped_task(config):
        task, cfg, tokenizer = build_task(config)
        train_batch = task.train_batch

        def batch(step):
            current["step"] = step + 1
            if phase == "batch" and step + 1 == at:
                _sigterm()
            return train_batch(step)

        return dataclasses.replace(task, train_batch=batch), cfg, tokenizer

    def wrapped_run(*args, **kwargs):
        run = compile_run(*args, **kwargs)
        train_step, eval_step = run.train_step, run.eval_step

        def step(state, batch):
            out = train_step(state, batch)  # dispatched asynchronously
            if phase == "train_step" and current["step"] == at:
                _sigterm()
            return out

        def evaluate(params, batch):
            out = eval_step(params, batch)
            if phase == "evaluation" and current["step"] == at:
                _sigterm()
            return out

        return dataclasses.replace(run, train_step=step, eval_step=evaluate)

    monkeypatch.setattr(trainer, "build_task", wrapped_task)
    monkeypatch.setattr(trainer, "compile_run", wrapped_run)
    if phase == "logging":
        write = run_log.RunLog.write

        def log(self, record):
            if record["step"] == at:
                _sigterm()
            return write(self, record)

        monkeypatch.setattr(run_log.RunLog, "write", log)
    elif phase == "checkpoint_save":
        save = checkpoint.Checkpointer.save

        def saving(self, step, state, **kwargs):
            started = save(self, step, state, **kwargs)  # the write goes on in the background
            if step == at:
                _sigterm()
            return started

        monkeypatch.setattr(checkpoint.Checkpointer, "save", saving)
    elif phase == "between_steps":
        update = loop._NoBar.update

        def after_step(self, n):  # the last call of a step that is neither logged nor saved
            update(self, n)
            if current["step"] == at:
                _sigterm()

        monkeypatch.setattr(loop._NoBar, "update", after_step)
    elif phase == "restore":
        restore = checkpoint.Checkpointer.restore

        def restoring(self, *args, **kwargs):
            state = restore(self, *args, **kwargs)
            _sigterm()
            return state

        monkeypatch.setattr(checkpoint.Checkpointer, "restore", restoring)


def _record_params(monkeypatch, params):
    """Keep the parameters after every step of a run in `params`, {step: NumPy tree}."""
    from transformer_jax.run import trainer

    compile_run = trainer.compile_run

    def wrapped_run(*args, **kwargs):
        run = compile_run(*args, **kwargs)

        def step(state, batch):
            state, metrics = run.train_step(state, batch)
            params[len(params) + 1] = jax.device_get(state.params)  # a copy, before donation
            return state, metrics

        return dataclasses.replace(run, train_step=step)

    monkeypatch.setattr(trainer, "compile_run", wrapped_run)


def _params(out_dir, step):
    """(the steps on disk, the parameters of `step` or None where it is not there)."""
    with checkpoint.Checkpointer(str(out_dir / "checkpoints")) as ckpt:
        steps = ckpt.all_steps()
        return steps, jax.tree.map(np.asarray, ckpt.restore_params(step)) if step in steps else None


@pytest.fixture(scope="module")
def phases(corpus, tmp_path_factory):
    """The uninterrupted reference run, and the chain of runs each stopped by a SIGTERM at
    one phase: {"reference": (out_dir, {step: params}), phase: what that run did}."""
    root = tmp_path_factory.mktemp("phases")
    reference, reference_params = root / "reference", {}
    with pytest.MonkeyPatch.context() as m:
        _record_params(m, reference_params)
        train(_config(corpus, reference, max_steps=MAX_STEPS, eval_every=1))
    out, results = root / "run", {"reference": (reference, reference_params)}
    for phase, at, settings, _ in PHASES:
        said = []
        start = _records(out)[-1]["step"] if (out / "metrics.jsonl").exists() else 0
        with pytest.MonkeyPatch.context() as m:
            _sigterm_during(m, phase, at)
            result = train(_config(corpus, out, max_steps=MAX_STEPS, **settings), say=said.append)
        steps, params = _params(out, result.step)
        results[phase] = dict(result=result, said=said, start=start, steps_on_disk=steps, params=params,
                              records=[r for r in _records(out) if r["step"] > start],
                              locked=(out / "run.lock").exists())
        if phase == "logging":
            shutil.copytree(out, root / "stopped")  # the tests of damaged runs start from here
    # A stop whose save fails (a full disk): it must say so, and why, and what is on disk.
    said = []
    with pytest.MonkeyPatch.context() as m:
        _sigterm_during(m, "logging", SAVE_FAILS_AT)

        def no_space(self, step, state, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", self.directory)

        m.setattr(checkpoint.Checkpointer, "save", no_space)
        try:
            train(_config(corpus, out, max_steps=MAX_STEPS, checkpoint_every=4), say=said.append)
            error = None
        except Exception as e:  # noqa: BLE001 - the test looks at it
            error = e
    results["save_fails"] = dict(said=said, error=error, steps_on_disk=_params(out, None)[0],
                                 locked=(out / "run.lock").exists())
    results["finished"] = train(_config(corpus, out, max_steps=MAX_STEPS))
    results["out"] = out
    return results


def test_a_stop_whose_save_fails_says_so_and_why(phases):
    got = phases["save_fails"]
    assert isinstance(got["error"], run_dir.DiskFullError), (got["error"], got["said"])
    assert "\n" not in str(got["error"]) and "disk full" in str(got["error"])
    assert [s for s in got["said"] if "SIGTERM" in s] == [
        f"SIGTERM received: could not save step {SAVE_FAILS_AT} ([Errno 28] No space left on device: "
        f"'{phases['out'] / 'checkpoints'}'); the latest checkpoint is step 13, exiting"]
    assert got["steps_on_disk"][-1] == 13 and not got["locked"]


def _same_metrics(got, want):
    keys = ("train_loss", "grad_norm", "lr", "val_loss")
    for g in got:
        w = want[g["step"]]
        assert {k: g[k] for k in keys if k in g} == {k: w[k] for k in keys if k in g}, g["step"]


@pytest.mark.parametrize("phase, at, settings, saved", PHASES, ids=[p[0] for p in PHASES])
def test_sigterm_at_each_phase_saves_the_step_says_so_and_resumes_exactly(phases, phase, at, settings,
                                                                          saved):
    got = phases[phase]
    reference_dir, reference_params = phases["reference"]
    assert got["result"].stopped_by == "SIGTERM" and got["result"].step == saved
    # what it said is true: that step is on disk, readable, and holds the uninterrupted run's values
    assert [s for s in got["said"] if "SIGTERM" in s] == [f"SIGTERM received: saved step {saved}, exiting"]
    assert got["steps_on_disk"][-1] == saved
    for key, want in jax.tree_util.tree_leaves_with_path(reference_params[saved]):
        np.testing.assert_array_equal(_leaf(got["params"], key), want, err_msg=f"{phase}: {key}")
    # nothing lost: every step since the resume was trained, the last one logged
    logged = [r["step"] for r in got["records"]]
    assert logged[-1] == saved and logged == sorted(set(logged)) and logged[0] <= got["start"] + 2
    _same_metrics(got["records"], {r["step"]: r for r in _records(reference_dir)})
    assert not got["locked"]  # the lock is released on the way out


def _leaf(tree, key):
    for path, value in jax.tree_util.tree_leaves_with_path(tree):
        if path == key:
            return value
    raise KeyError(key)


def test_the_chain_of_stopped_runs_ends_where_the_uninterrupted_run_does(phases):
    reference_dir, reference_params = phases["reference"]
    finished, out = phases["finished"], phases["out"]
    assert finished.step == MAX_STEPS and finished.stopped_by is None
    final = jax.device_get(finished.state.params)
    for key, want in jax.tree_util.tree_leaves_with_path(reference_params[MAX_STEPS]):
        np.testing.assert_array_equal(_leaf(final, key), want, err_msg=str(key))
    records = _records(out)
    # steps 1..16 once each (11 only went unlogged: log_every=2 in that run), none twice
    assert [r["step"] for r in records] == [s for s in range(1, MAX_STEPS + 1) if s != 11]
    _same_metrics(records, {r["step"]: r for r in _records(reference_dir)})


@pytest.fixture(scope="module")
def stopped_run(phases):
    """The first run of the chain, stopped by a SIGTERM while step 3 was logged (checkpoints
    every 2 steps, so only the signal's own save kept step 3): (out_dir, TrainResult, said)."""
    return phases["out"].parent / "stopped", phases["logging"]["result"], phases["logging"]["said"]


def _copy(stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run[0], out)
    return out


def test_the_stopped_run_holds_what_it_said(stopped_run):
    out, result, said = stopped_run
    with checkpoint.Checkpointer(str(out / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [2, 3]
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    assert not (out / "run.lock").exists()


class _Saver:
    """A Checkpointer's save outcome as `stop_signal.say_saved` sees it (latest step on disk, or
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
    stop_signal.say_saved(_Saver(5), "SIGTERM", 5, said.append)
    stop_signal.say_saved(_Saver(3), "SIGINT", 5, said.append)
    with pytest.raises(OSError, match="No space"):
        stop_signal.say_saved(_Saver(3, OSError(errno.ENOSPC, "No space left on device")), "SIGTERM", 5,
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
             "--eval-batches", "2", "--log-every", "1", "--checkpoint-every", "2", "--sample-tokens", "0", "--warmup-steps", "2",
             "--decay-steps", "16", "--dropout", "0.1"]
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
