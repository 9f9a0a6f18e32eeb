"""The rules of a run directory: what the package writes there, when a run may start,
resume or overwrite, one writer at a time, and reading its JSON files with clear errors.

    with open_run_dir(out_dir, overwrite=False, resume=False) as status:   # process 0 only
        ...  # status.resume: continue from status.config; else write a fresh run

`open_run_dir` checks the directory before writing anything, takes the one-writer lock,
then (under the lock) empties an overwritten run; the lock is released on exit. A run of
several processes calls `open_run_dir_on_all_processes` on every process instead: process 0
does the above and its outcome (or failure) reaches the others.

The rules:
* A run never deletes or overwrites what it did not write. A new run goes into a
  missing or empty folder; a non-empty folder that is not a run is refused.
* `overwrite=True` removes only what the package writes (`is_run_file`), never
  anything else in the folder, and only in a folder that is a run.
* A folder with checkpoints but no readable config.json is an error naming what is
  missing, never a fresh start.
* One writer per run: `RunLock` makes a second run fail at once naming the holder;
  a lock left by a dead process (same host: its pid is gone, or reused by a process
  started at another time) is taken over.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from typing import Any, Callable, Iterator

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"
# Everything the package writes into a run directory, in one place: `overwrite` removes
# these and nothing else. (TensorBoard events come from run_log's SummaryWriter; the
# *.tmp names are this module's atomic writes cut short.)
# vectors.txt, vocab.txt and encoded_corpus/ are a word-vector run's.
RUN_FILES = (CONFIG_FILE, "tokenizer.json", METRICS_FILE, "loss.png", "sample.txt", LOCK_FILE,
             "vectors.txt", "vocab.txt")
RUN_DIRS = (CHECKPOINT_DIR, "encoded_corpus")
# A word-vector run's config.json is its WordVectorConfig: these objectives and a dimension.
WORD_VECTOR_OBJECTIVES = ("cbow", "skipgram", "glove")
RUN_PATTERNS = ("events.out.tfevents.*", ".*.transformer_jax.tmp")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (the message says why and what to do)."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


@dataclasses.dataclass(frozen=True)
class RunDirStatus:
    """What `prepare_run_dir` found: `resume` True for an existing run (whose parsed
    config.json is `config`), False for a fresh start in an empty directory."""

    resume: bool
    config: dict | None = None


def is_run_file(name: str) -> bool:
    """Whether an entry named `name` at the top of a run directory is written by the package."""
    return name in RUN_FILES or name in RUN_DIRS or any(fnmatch.fnmatch(name, p) for p in RUN_PATTERNS)


@contextlib.contextmanager
def open_run_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
                 resume: bool = False) -> Iterator[RunDirStatus]:
    """`prepare_run_dir` under the directory's `RunLock`, held until the block exits.

    Everything that can be refused is refused before the lock file is written (a
    foreign folder gets nothing written into it).
    """
    prepare_run_dir(out_dir, overwrite=overwrite, resume=resume, dry_run=True)
    os.makedirs(out_dir, exist_ok=True)
    with RunLock(out_dir):
        yield prepare_run_dir(out_dir, overwrite=overwrite, resume=resume)


# What process 0 broadcasts about a run directory: 1 resume, 0 start afresh, or a failure.
REJECTED, LOCKED = -1, -2


@contextlib.contextmanager
def open_run_dir_on_all_processes(out_dir: str | os.PathLike, *, overwrite: bool = False,
                                  resume: bool = False, check: Callable[[RunDirStatus], None] | None = None
                                  ) -> Iterator[RunDirStatus]:
    """`open_run_dir` for a run of one or several processes (jax.distributed): process 0
    opens and locks the directory, runs `check(status)` there under the lock (e.g. compares
    the recorded config, raising ValueError), and its outcome reaches every process. Each
    gets the RunDirStatus (`config` on process 0 only) or raises: process 0 its own error,
    the others one saying process 0 failed (RunLockedError when another run holds the
    lock), so none waits for a process that gave up.
    """
    import jax

    with contextlib.ExitStack() as stack:
        decision, error = 0, None
        if jax.process_index() == 0:
            try:
                status = stack.enter_context(open_run_dir(out_dir, overwrite=overwrite, resume=resume))
                if check is not None:
                    check(status)
                decision = int(status.resume)
            except Exception as e:  # noqa: BLE001 - any failure (a full disk too) reaches every process
                stack.close()
                decision, error = (LOCKED if isinstance(e, RunLockedError) else REJECTED), e
        decision = agree(decision, error, os.fspath(out_dir))
        yield status if jax.process_index() == 0 else RunDirStatus(resume=decision == 1)


def agree(decision: int, error: Exception | None, out_dir: str) -> int:
    """Process 0's `decision` (1, 0, REJECTED or LOCKED) on every process of a multi-process
    run (a collective: every process calls it); `error` (process 0's failure) is re-raised
    there, and the other processes raise one naming process 0's failure."""
    import jax

    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        decision = int(multihost_utils.broadcast_one_to_all(np.int32(decision)))
    if error is not None:
        raise error
    if decision == LOCKED:
        raise RunLockedError(f"--out-dir {out_dir!r} could not be locked by process 0: another run "
                             f"holds it (process 0 names the holder)")
    if decision < 0:
        raise RunDirError(f"--out-dir {out_dir!r} was rejected by process 0 (see its error)")
    return decision


def prepare_run_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
                    resume: bool = False, dry_run: bool = False) -> RunDirStatus:
    """Check `out_dir` for a fresh or resumed run and make it ready (`open_run_dir` calls it
    under the lock; `dry_run=True` only checks and changes nothing).

    * missing or empty: created; a fresh start (an error with `resume=True`);
    * a run (config.json or checkpoints/ present): resumed, with its config parsed, or
      with `overwrite=True` emptied of the package's files (`is_run_file`), others kept;
    * anything else non-empty: RunDirError, whatever `overwrite` says.

    Raises RunDirError naming the directory and the missing or unreadable file: a run
    with checkpoints but no (readable) config.json, `resume` and `overwrite` together,
    `resume` with nothing to resume; RunLockedError when `overwrite` would remove the
    files of a run another live process holds.
    """
    out_dir = os.fspath(out_dir)
    if resume and overwrite:
        raise RunDirError("resume (--resume) and overwrite (--overwrite) contradict each other: "
                          "pass one")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"out_dir {out_dir!r} exists and is not a directory")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    config_path = os.path.join(out_dir, CONFIG_FILE)
    # Another tool's config.json (a Hugging Face model folder has one, and a tokenizer.json)
    # does not make a run: only ours, or checkpoints, do.
    ours = CONFIG_FILE in entries and _is_run_config(config_path)
    is_run = ours or _has_checkpoints(out_dir)
    if entries and not is_run:
        foreign = [n for n in entries if not is_run_file(n) or n == CONFIG_FILE]
        if foreign:
            raise RunDirError(
                f"out_dir {out_dir!r} is not empty and holds no run ({len(foreign)} entries the "
                f"package did not write, e.g. {foreign[:3]}): nothing was changed; choose a new "
                f"or empty directory")
    if overwrite:
        if entries:
            _check_not_locked(out_dir)
            if not dry_run:
                remove_run_files(out_dir)
        if not dry_run:
            os.makedirs(out_dir, exist_ok=True)
        return RunDirStatus(resume=False)
    if is_run:
        if CONFIG_FILE not in entries:
            raise RunDirError(
                f"out_dir {out_dir!r} holds checkpoints but no {CONFIG_FILE}: the run cannot be "
                f"resumed without it. Restore {config_path} (e.g. from a backup), or pass "
                f"overwrite (--overwrite) to discard the run")
        config = read_json(config_path, "the run's config")
        if not ours:
            raise RunDirError(f"the run's config {config_path!r} is not a run configuration (a JSON "
                              f"object with a \"model\" object, or a word-vector run's): it was "
                              f"changed or replaced")
        return RunDirStatus(resume=True, config=config)
    if entries and entries != [LOCK_FILE]:  # leftovers of ours, from a run that never wrote its config
        raise RunDirError(
            f"out_dir {out_dir!r} holds run files {entries[:4]} but no {CONFIG_FILE} and no "
            f"checkpoint: pass overwrite (--overwrite) to remove them, or choose another directory")
    if resume:
        raise RunDirError(f"resume (--resume): {out_dir!r} holds no run to resume")
    if not dry_run:
        os.makedirs(out_dir, exist_ok=True)
    return RunDirStatus(resume=False)


def remove_run_files(out_dir: str | os.PathLike) -> list[str]:
    """Remove the package's files and folders from the top of `out_dir` (symlinks are
    unlinked, never followed); everything else stays, and so does the lock file (its holder
    removes it). Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(out_dir)):
        if not is_run_file(name) or name == LOCK_FILE:
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        removed.append(name)
    return removed


def _is_run_config(path: str) -> bool:
    """Whether `path` parses as a run's config.json: a JSON object with a "model" object (a
    transformer run) or a word-vector run's objective and dimension."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    return isinstance(config.get("model"), dict) or (
        config.get("objective") in WORD_VECTOR_OBJECTIVES and isinstance(config.get("dimension"), int))


def _has_checkpoints(out_dir: str) -> bool:
    path = os.path.join(out_dir, CHECKPOINT_DIR)
    return os.path.isdir(path) and bool(os.listdir(path))


# ------------------------------------------------------------------------ JSON files


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON file at `path`; `what` names it in errors ("the run's config").

    Raises FileNotFoundError or RunDirError, one line naming the file and what is wrong
    (a truncated or damaged file: the parser's line and column).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise RunDirError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start}): "
                          f"the file is damaged") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunDirError(f"{what} {path!r} is not valid JSON ({e.msg} at line {e.lineno} column "
                          f"{e.colno}{', the end of the file' if e.pos >= len(text.rstrip()) else ''}): "
                          f"the file is truncated or damaged") from None


def read_jsonl(path: str | os.PathLike, what: str = "metrics") -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist), skipping blank lines.

    A last line without its newline that does not parse is what a killed writer leaves:
    it is dropped with a warning. Any other bad line raises RunDirError naming the file
    and the line.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: cut short while being written
                warnings.warn(f"{what} {path!r}: dropped the incomplete last line {number} "
                              f"({line[:40]!r}), left by an interrupted write", stacklevel=2)
                continue
            raise RunDirError(f"{what} {path!r} line {number} is not valid JSON ({e.msg} at "
                              f"column {e.colno}): the file is damaged") from None
    return records


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader, or a run killed
    meanwhile, sees the old file or the new one, never a part."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.transformer_jax.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`write_atomic` of `data` as indented JSON."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------ the lock


class RunLock:
    """The one-writer lock of a run directory: `<out_dir>/run.lock`, a JSON file naming
    the holder (pid, hostname, process start time, a token).

    Enter it on process 0 only, after `prepare_run_dir`: entering raises RunLockedError at
    once when a live process holds the lock; a lock of a dead process on this host is taken
    over (with a warning). A lock held on another host cannot be checked and counts as live
    (the message says to delete the file if that run is gone). Leaving removes the file, if
    it is still ours.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = os.fspath(out_dir)
        self.path = os.path.join(self.out_dir, LOCK_FILE)
        self._token: str | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        me = _this_process()
        me["token"] = secrets.token_hex(8)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._token = me["token"]
            return
        raise RunLockedError(f"could not take the lock {self.path!r}: other runs keep taking it")

    def release(self) -> None:
        if self._token is None:
            return
        holder = _read_holder(self.path)
        if holder is not None and holder.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._token = None

    def _take_over_if_stale(self) -> None:
        """Raise RunLockedError if the lock's holder is alive, else remove the lock. The check
        and the removal happen under an flock of the directory, so two runs that both find a
        stale lock cannot remove each other's fresh one."""
        with _flocked(self.out_dir):
            holder = _read_holder(self.path)
            if holder is None and not os.path.exists(self.path):
                return  # released meanwhile: try again
            state = _holder_state(holder, self.path)
            if state == "alive":
                raise RunLockedError(
                    f"{self.out_dir!r} is in use by {_describe(holder)} (lock file {self.path}): "
                    f"one writer per run. Wait for it, or choose another out_dir; if that "
                    f"process is gone (e.g. on another machine), delete {self.path}")
            warnings.warn(f"taking over the lock {self.path} left by {_describe(holder)}, "
                          f"which is no longer running", stacklevel=4)
            os.unlink(self.path)


def lock_holder(out_dir: str | os.PathLike) -> dict | None:
    """The live holder of `out_dir`'s lock ({"pid", "hostname", "start_time", ...}), or None."""
    path = os.path.join(os.fspath(out_dir), LOCK_FILE)
    holder = _read_holder(path)
    return holder if holder is not None and _holder_state(holder, path) == "alive" else None


def _check_not_locked(out_dir: str) -> None:
    holder = lock_holder(out_dir)
    me = _this_process()
    if holder is not None and (holder.get("pid"), holder.get("hostname")) != (me["pid"], me["hostname"]):
        raise RunLockedError(f"overwrite (--overwrite): {out_dir!r} is in use by {_describe(holder)}; "
                             f"nothing was removed")


# An unreadable lock file younger than this may be one being written right now.
_UNREADABLE_GRACE_S = 10.0


def _holder_state(holder: dict | None, path: str) -> str:
    """"alive" or "stale" for the holder recorded in a lock file."""
    if holder is None:  # empty or cut short: its writer died between create and write, or is writing
        try:
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return "stale"
        return "alive" if age < _UNREADABLE_GRACE_S else "stale"
    if holder.get("hostname") != socket.gethostname():
        return "alive"  # cannot look at another machine's processes
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "stale"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "stale"
    except PermissionError:
        pass  # exists, owned by someone else
    started = _process_start_time(pid)
    if started is not None and holder.get("start_time") is not None and started != holder["start_time"]:
        return "stale"  # the pid now belongs to another process
    return "alive"


def _read_holder(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _this_process() -> dict:
    pid = os.getpid()
    return {"pid": pid, "hostname": socket.gethostname(), "start_time": _process_start_time(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _process_start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (Linux /proc); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its last ")".
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "a process that is still writing its lock file"
    return f"pid {holder.get('pid')} on {holder.get('hostname')} (since {holder.get('since')})"


@contextlib.contextmanager
def _flocked(directory: str) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


# ------------------------------------------------------------------------ disk full


class DiskFullError(OSError):
    """No space left on the device (errno ENOSPC), with the directory being written."""


@contextlib.contextmanager
def disk_full_as_error(directory: str | os.PathLike, what: str = "writing") -> Iterator[None]:
    """Turn an ENOSPC raised in the block, anywhere in its exception's chain (Orbax wraps
    the OSError of its writer threads; tensorstore reports it as a ValueError naming errno
    28), into one DiskFullError: "disk full: no space left on the device holding
    <directory> while <what>"."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - only a full disk is translated, the rest re-raised
        if not is_disk_full(e):
            raise
        raise DiskFullError(errno.ENOSPC, f"disk full: no space left on the device holding "
                                          f"{os.fspath(directory)} while {what}") from None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it wraps: cause, context, exception group) is a full disk."""
    stack, seen = [error], 0
    while stack and seen < 50:
        e = stack.pop()
        seen += 1
        if e is None:
            continue
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False
