"""Tests for transformer_jax.run_dir: what a run may delete, resume rules, JSON errors, the lock."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from processes import REPO, cpu_env
from transformer_jax import run_dir


def _tree(root):
    """{relative path: file bytes (None for folders)} of everything under root."""
    out = {}
    for base, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), root)] = None
        for f in files:
            with open(os.path.join(base, f), "rb") as fh:
                out[os.path.relpath(os.path.join(base, f), root)] = fh.read()
    return out


def _make_run(path, extra=()):
    """A run folder as train.py leaves it, plus user files `extra`."""
    (path / "checkpoints" / "5").mkdir(parents=True)
    (path / "checkpoints" / "5" / "data").write_bytes(os.urandom(64))
    (path / "config.json").write_text(json.dumps({"model": {"d_model": 8}, "train": {}}))
    for name in ("tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt",
                 "events.out.tfevents.1700000000.host.1.0"):
        (path / name).write_bytes(os.urandom(16))
    for name in extra:
        (path / name).write_bytes(os.urandom(16))


def test_missing_or_empty_folder_is_a_fresh_start(tmp_path):
    status = run_dir.prepare_run_dir(tmp_path / "new" / "run")
    assert status == run_dir.RunDirStatus(resume=False) and (tmp_path / "new" / "run").is_dir()
    assert run_dir.prepare_run_dir(tmp_path / "new" / "run").resume is False


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_and_untouched(tmp_path, overwrite):
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "train.py").write_text("print('mine')\n")
    (tmp_path / "loss.png").write_bytes(b"a user's picture")  # a name we use, in a folder that is no run
    before = _tree(tmp_path)
    with pytest.raises(run_dir.RunDirError, match="not empty and holds no run .*nothing was changed"):
        with run_dir.open_run_dir(tmp_path, overwrite=overwrite):
            pass
    assert _tree(tmp_path) == before  # not even a lock file was written


def test_overwrite_removes_only_what_the_package_wrote(tmp_path):
    _make_run(tmp_path, extra=("notes.txt",))
    (tmp_path / "my_analysis").mkdir()
    (tmp_path / "my_analysis" / "plot.png").write_bytes(b"keep me")
    kept = {k: v for k, v in _tree(tmp_path).items() if k.startswith(("notes.txt", "my_analysis"))}
    with run_dir.open_run_dir(tmp_path, overwrite=True) as status:
        assert status.resume is False
        assert sorted(os.listdir(tmp_path)) == ["my_analysis", "notes.txt", "run.lock"]
    assert _tree(tmp_path) == kept


def test_an_existing_run_is_resumed_with_its_config(tmp_path):
    _make_run(tmp_path)
    before = _tree(tmp_path)
    with run_dir.open_run_dir(tmp_path, resume=True) as status:
        assert status.resume and status.config == {"model": {"d_model": 8}, "train": {}}
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("config", ["missing", "truncated", "replaced"])
def test_checkpoints_without_a_readable_config_are_an_error_not_a_fresh_start(tmp_path, config):
    _make_run(tmp_path)
    path = tmp_path / "config.json"
    if config == "missing":
        path.unlink()
    elif config == "truncated":
        path.write_text(path.read_text()[:11])
    else:
        path.write_text("[1, 2]")
    before = _tree(tmp_path)
    expected = {"missing": "holds checkpoints but no config.json",
                "truncated": f"config {str(path)!r} is not valid JSON .*truncated",
                "replaced": "is not a run configuration"}[config]
    with pytest.raises(run_dir.RunDirError, match=expected):
        with run_dir.open_run_dir(tmp_path):
            pass
    assert _tree(tmp_path) == before  # checkpoints kept, and the lock released


def test_leftovers_without_config_or_checkpoints_need_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(run_dir.RunDirError, match="no config.json and no checkpoint: pass overwrite"):
        run_dir.prepare_run_dir(tmp_path)
    assert run_dir.prepare_run_dir(tmp_path, overwrite=True).resume is False
    assert os.listdir(tmp_path) == []


def test_resume_with_nothing_to_resume_and_resume_with_overwrite_are_errors(tmp_path):
    with pytest.raises(run_dir.RunDirError, match="holds no run to resume"):
        run_dir.prepare_run_dir(tmp_path, resume=True)
    with pytest.raises(run_dir.RunDirError, match="contradict"):
        run_dir.prepare_run_dir(tmp_path, resume=True, overwrite=True)


def test_symlinked_package_folder_is_unlinked_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    os.symlink(outside, run / "checkpoints")
    run_dir.remove_run_files(run)
    assert os.listdir(run) == [] and (outside / "precious").read_text() == "x"


# ------------------------------------------------------------------ JSON files


def test_read_json_names_the_file_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model": {"d_model": 3')
    with pytest.raises(run_dir.RunDirError) as e:
        run_dir.read_json(path, "the run's config")
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "the end of the file" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_dir.read_json(tmp_path / "nope.json", "the run's config")


def test_read_jsonl_drops_a_cut_last_line_and_names_a_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="incomplete last line 3"):
        assert run_dir.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(run_dir.RunDirError, match=f"{str(path)!r} line 2 is not valid JSON"):
        run_dir.read_jsonl(path)


def test_write_atomic_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    run_dir.write_json_atomic(path, {"a": 1})

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError) as e:
        run_dir.write_json_atomic(path, {"a": 2})
    assert run_dir.is_disk_full(e.value)
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]


# ------------------------------------------------------------------ the lock

HOLDER = """
import sys, time
from transformer_jax import run_dir
with run_dir.open_run_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""

CONTENDER = """
import sys
from transformer_jax import run_dir
try:
    with run_dir.open_run_dir(sys.argv[1]):
        print("got the lock")
except run_dir.RunLockedError as e:
    print(e)
    sys.exit(3)
"""


def test_a_second_process_fails_at_once_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=cpu_env(), cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-c", CONTENDER, str(run)], env=cpu_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert time.monotonic() - start < 30
        assert second.returncode == 3, second.stdout + second.stderr
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in second.stdout
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (run / "run.lock").exists()  # kill -9: nothing released it
    with pytest.warns(UserWarning, match=f"taking over the lock .* pid {holder.pid} "):
        with run_dir.open_run_dir(run) as status:
            assert status.resume is False
            assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    assert not (run / "run.lock").exists()  # released on exit


def test_a_reused_pid_is_a_stale_lock_and_another_host_counts_as_alive(tmp_path):
    me = run_dir._this_process()
    (tmp_path / "run.lock").write_text(json.dumps({**me, "start_time": me["start_time"] - 1}))
    with pytest.warns(UserWarning, match="taking over"):
        with run_dir.RunLock(tmp_path):
            pass
    (tmp_path / "run.lock").write_text(json.dumps({**me, "hostname": "other-machine"}))
    with pytest.raises(run_dir.RunLockedError, match="on other-machine .*delete .*run.lock"):
        with run_dir.RunLock(tmp_path):
            pass
    assert json.loads((tmp_path / "run.lock").read_text())["hostname"] == "other-machine"


def test_overwrite_refuses_a_run_another_live_process_holds(tmp_path):
    _make_run(tmp_path)
    me = run_dir._this_process()
    (tmp_path / "run.lock").write_text(json.dumps({**me, "hostname": "other-machine"}))
    before = _tree(tmp_path)
    with pytest.raises(run_dir.RunLockedError, match="nothing was removed"):
        run_dir.prepare_run_dir(tmp_path, overwrite=True)
    assert _tree(tmp_path) == before


def test_disk_full_anywhere_in_the_chain_becomes_one_error_naming_the_directory(tmp_path):
    def nested():
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("background save failed") from e

    with pytest.raises(run_dir.DiskFullError) as e:
        with run_dir.disk_full_as_error(tmp_path / "run", "writing metrics"):
            nested()
    assert str(e.value) == (f"[Errno 28] disk full: no space left on the device holding "
                            f"{tmp_path / 'run'} while writing metrics")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(PermissionError):  # anything else passes through unchanged
        with run_dir.disk_full_as_error(tmp_path, "writing"):
            raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("overwrite", [False, True])
def test_another_tools_config_and_tokenizer_files_do_not_make_a_run(tmp_path, overwrite):
    """A Hugging Face model folder holds config.json and tokenizer.json too: never removed."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    before = _tree(tmp_path)
    with pytest.raises(run_dir.RunDirError, match="holds no run .*'config.json'"):
        with run_dir.open_run_dir(tmp_path, overwrite=overwrite):
            pass
    assert _tree(tmp_path) == before
