"""Checkpoints of a TrainState with Orbax: async, atomic, checksummed, keep-last-N plus best.

A checkpoint holds four Orbax items: "params", "opt_state", "progress" ({"step",
"rng"}: the data position and the dropout key), so a run continues exactly and
fine-tuning can read the parameters alone, and "checksums": for every array, its
path, shape, dtype and a checksum of its values (`tree_checksums`), the whole
manifest sealed by a SHA-256 of itself.

Atomicity comes from Orbax: a step is written to `<step>.orbax-checkpoint-tmp-*`
and renamed to `<step>` only once complete (manifest included), and unfinished
temporary directories are never listed as steps.

Restoring tells three failures apart:
* the checkpoint does not fit the target (a path, shape or dtype differs from the
  manifest): `CheckpointMismatchError`, a configuration error; nothing is renamed;
* the checkpoint is damaged (a file cannot be parsed or is missing, or the restored
  values fail their checksums): `CorruptCheckpointError`. `restore` sets such a step
  aside (renamed `<step>.corrupt-<time>`, never deleted) with a warning and falls back
  to the next older one; `restore_params` (a reader: sampling, fine-tuning) skips it
  with a warning and renames nothing;
* anything else (out of memory, a permission or I/O error): raised as it is.
A directory whose checkpoints are all damaged (or set aside earlier) raises
`NoReadableCheckpointError`; only a directory that never held a checkpoint restores None.

A full disk while saving raises `DiskFullError`, one line naming the path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from transformer_jax.run_dir import DiskFullError, disk_full_as_error  # noqa: F401 - re-exported
from transformer_jax.training import TrainState

_ITEMS = ("params", "opt_state", "progress")
_MANIFEST = "checksums"
_MANIFEST_VERSION = 1
# Names `restore` gives the steps it sets aside; listed so a directory of only these is an error.
_SET_ASIDE = re.compile(r"^(\d+)\.corrupt-\d+$")
# tensorstore reports I/O failures as ValueError "<STATUS>: ...": these say nothing is wrong
# with the files themselves, so they are raised, never taken for corruption.
_TRANSIENT_STATUS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                     "CANCELLED", "ABORTED")


class CheckpointError(ValueError):
    """Base of the errors a checkpoint directory's content can cause."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that cannot be parsed, misses files, or fails its checksums."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose arrays do not fit the target (a configuration change)."""


class NoReadableCheckpointError(CheckpointError):
    """A directory that holds checkpoints, none of them readable."""


class Checkpointer:
    """An Orbax CheckpointManager over one run's checkpoint directory.

    Args:
      directory: where the step directories live (created if missing): a local path
        (made absolute) or a URL such as gs://bucket/run (kept as given).
      max_to_keep: the newest `max_to_keep` checkpoints are kept ...
      keep_best: ... plus the `keep_best` with the lowest validation loss.
      async_save: write in a background thread (the device-to-host copy is still
        synchronous, so the caller may donate the state right after `save`).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_best: int = 1,
                 async_save: bool = True):
        if not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(f"max_to_keep={max_to_keep!r}: expected a positive int")
        if not (isinstance(keep_best, int) and keep_best >= 0):
            raise ValueError(f"keep_best={keep_best!r}: expected an int >= 0")
        self.directory = _resolve_directory(directory)
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=max_to_keep),
            # reverse=True sorts by descending loss and keeps the tail: the lowest.
            policies.BestN(get_metric_fn=_val_loss, reverse=True, n=keep_best,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # Orbax writes metrics to disk only when it tracks a best_fn.
            best_fn=_val_loss,
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        # Naming the handlers lets a fresh manager read item metadata (restore_params).
        handlers = {name: ocp.StandardCheckpointHandler() for name in _ITEMS}
        handlers[_MANIFEST] = ocp.JsonCheckpointHandler()
        _quiet_disk_full_logs()
        _set_aside_unlistable_steps(self.directory)
        with disk_full_as_error(self.directory, "creating the checkpoint directory"):
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        self._saving: int | None = None

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest saved validation loss (None if none has one)."""
        ranked = self._ranked_by_loss()
        return ranked[0] if ranked else None

    def set_aside(self) -> list[str]:
        """Names of the step directories set aside as corrupt (`<step>.corrupt-<time>`)."""
        path = epath.Path(self.directory)
        if not path.exists():
            return []
        return sorted(p.name for p in path.iterdir() if _SET_ASIDE.match(p.name))

    def _ranked_by_loss(self) -> list[int]:
        scored = []
        for s in self.all_steps():
            try:
                m = self._manager.metrics(s)
            except Exception:  # noqa: BLE001 - an unreadable metrics file ranks the step last
                m = None
            if m and "val_loss" in m:
                scored.append((m["val_loss"], s))
        return [s for _, s in sorted(scored)]

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: TrainState, *, val_loss: float | None = None,
             force: bool = False) -> bool:
        """Start saving `state` as checkpoint `step` (returns once the arrays are on the host).

        Raises ValueError, and writes nothing, if any parameter or optimizer value
        is non-finite; DiskFullError (here or from `wait`/`close`, since the writing is
        asynchronous) when the device runs out of space. Returns False if a checkpoint
        for `step` (or a later one) already exists and `force` is False.
        """
        progress = {"step": state.step, "rng": state.rng}
        items = {"params": state.params, "opt_state": state.opt_state, "progress": progress}
        finite, checksums = _digest(items)
        if not finite:
            raise ValueError(f"refusing to save a non-finite train state at step {step}")
        # Always a dict (Orbax warns on a missing one); without val_loss it ranks last.
        metrics = {} if val_loss is None else {"val_loss": float(val_loss)}
        self.wait()  # Orbax would wait too: here a failure of the previous save is named as such
        self._saving = step
        with disk_full_as_error(self.directory, f"saving checkpoint step {step}"):
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
                    **{_MANIFEST: ocp.args.JsonSave(_seal(items, checksums))},
                ),
                metrics=metrics,
                force=force,
            )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (DiskFullError if they could not be)."""
        with disk_full_as_error(self.directory, self._what_was_saving()):
            self._manager.wait_until_finished()

    def close(self) -> None:
        # Orbax (0.12) removes unfinished temporary directories in a background thread when it
        # opens a directory, and waits for it in save() only: without this wait, a process that
        # ends soon after opening (an error before any save) has that thread fail noisily at
        # interpreter shutdown.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        with disk_full_as_error(self.directory, self._what_was_saving()):
            self._manager.close()

    def _what_was_saving(self) -> str:
        return "saving a checkpoint" if self._saving is None else f"saving checkpoint step {self._saving}"

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def restore(self, target: TrainState, step: int | None = None) -> TrainState | None:
        """Restore onto `target`, a TrainState of jax.ShapeDtypeStruct (with shardings).

        With `step=None`: the newest checkpoint that passes its checksums. Damaged newer
        ones are reported with a warning and set aside (renamed `<step>.corrupt-<time>`,
        so later saves can reuse their step numbers). Returns None only if the directory
        has never held a checkpoint.
        With an explicit `step`: that one, and every error propagates, nothing renamed.

        Raises:
          CheckpointMismatchError: the checkpoint's arrays do not fit `target` (nothing renamed).
          NoReadableCheckpointError: checkpoints exist (or were set aside) but none is readable.
        """
        if step is not None:
            return self._restore_step(target, step)
        steps = self.all_steps()
        for s in reversed(steps):
            try:
                return self._restore_step(target, s)
            except CorruptCheckpointError as e:
                warnings.warn(f"{e}; setting this unreadable checkpoint aside, falling back to an "
                              "older one", stacklevel=2)
                self._quarantine(s)
        aside = self.set_aside()
        if steps or aside:
            raise NoReadableCheckpointError(
                f"no readable checkpoint in {self.directory} (damaged: {aside}); nothing was "
                f"deleted: move the damaged steps away, or start a new run elsewhere")
        return None

    def restore_params(self, step: int | None = None) -> Any:
        """The parameters alone as NumPy arrays, checksums verified; readable on any machine,
        whatever mesh saved them.

        From `step` if given (errors propagate); else the best checkpoint by validation
        loss, falling back (with a warning, renaming nothing) to the next best, then to
        the others newest first, when one is damaged.

        Raises FileNotFoundError if there is no checkpoint, NoReadableCheckpointError if
        none is readable.
        """
        if step is not None:
            return self._restore_params_step(step)
        ranked = self._ranked_by_loss()
        candidates = ranked + [s for s in reversed(self.all_steps()) if s not in ranked]
        for s in candidates:
            try:
                return self._restore_params_step(s)
            except CorruptCheckpointError as e:
                warnings.warn(f"{e}; trying the next checkpoint", stacklevel=2)
        if candidates or self.set_aside():
            raise NoReadableCheckpointError(
                f"no readable checkpoint in {self.directory} (tried steps {candidates}, "
                f"set aside earlier: {self.set_aside()})")
        raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def _restore_params_step(self, step: int) -> Any:
        manifest = self._read_manifest(step)
        target = self._params_target(step)
        if manifest is not None:
            try:
                self._check_fits(step, {"params": target}, {"params": manifest["items"]["params"]})
            except CheckpointMismatchError:  # both describe this checkpoint: one was altered
                raise self._corrupt(step, "its metadata disagrees with its checksum manifest") from None
        restored = self._read_items(step, {"params": target})
        if manifest is not None:
            self._verify(step, {"params": restored["params"]},
                         {"params": manifest["items"]["params"]})
        return jax.tree.map(np.asarray, restored["params"])

    def _restore_step(self, target: TrainState, step: int) -> TrainState:
        progress = {"step": target.step, "rng": target.rng}
        targets = {"params": target.params, "opt_state": target.opt_state, "progress": progress}
        manifest = self._read_manifest(step)
        if manifest is not None:
            self._check_fits(step, targets, manifest["items"])
        restored = self._read_items(step, targets)
        if manifest is not None:
            self._verify(step, restored, manifest["items"])
        p = restored["progress"]
        return TrainState(step=p["step"], params=restored["params"],
                          opt_state=restored["opt_state"], rng=p["rng"])

    # ------------------------------------------------------------------ restore helpers

    def _step_path(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def _read_manifest(self, step: int) -> dict | None:
        """The step's sealed manifest; None for a checkpoint saved before manifests existed
        (no "checksums" item at all). CorruptCheckpointError when it cannot be trusted."""
        if not (self._step_path(step) / _MANIFEST).exists():
            if not self._step_path(step).exists():
                raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}")
            warnings.warn(f"checkpoint step {step} in {self.directory} has no checksums "
                          "(saved by an older version): restored unverified", stacklevel=3)
            return None
        try:
            manifest = self._manager.restore(
                step, args=ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()}))[_MANIFEST]
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise self._corrupt(step, f"its checksum manifest cannot be read ({_brief(e)})") from None
        if not _sealed_ok(manifest):
            raise self._corrupt(step, "its checksum manifest fails its own digest")
        return manifest

    def _check_fits(self, step: int, targets: dict, saved: dict) -> None:
        """CheckpointMismatchError listing how `targets` differ from the saved arrays."""
        problems = []
        for name, tree in targets.items():
            want = {path: (list(shape), dtype) for path, shape, dtype in _leaf_specs(tree)}
            have = {path: (e["shape"], e["dtype"]) for path, e in saved.get(name, {}).items()}
            problems += [f"{p}: saved {tuple(have[p][0])} {have[p][1]}, expected "
                         f"{tuple(want[p][0])} {want[p][1]}" for p in want if p in have and have[p] != want[p]]
            problems += [f"{p}: not in the checkpoint" for p in want if p not in have]
            problems += [f"{p}: in the checkpoint, not in the model" for p in have if p not in want]
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not fit this model/optimizer "
                f"({len(problems)} difference(s): {'; '.join(problems[:4])}"
                f"{'; ...' if len(problems) > 4 else ''}): a configuration change, not damage; "
                f"nothing was renamed")

    def _read_items(self, step: int, targets: dict) -> dict:
        """Orbax restore of `targets` (item name -> tree of ShapeDtypeStruct); parse failures
        become CorruptCheckpointError, environment failures propagate."""
        args = ocp.args.Composite(**{name: ocp.args.StandardRestore(t) for name, t in targets.items()})
        try:
            return self._manager.restore(step, args=args)
        except (MemoryError, PermissionError):
            raise
        except FileNotFoundError as e:
            raise self._corrupt(step, f"a file is missing ({_brief(e)})") from None
        except OSError:
            raise
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            if any(status in str(e)[:200] for status in _TRANSIENT_STATUS):
                raise
            raise self._corrupt(step, f"it cannot be parsed ({_brief(e)})") from None

    def _verify(self, step: int, restored: dict, saved: dict) -> None:
        _, got = _digest(restored)
        bad = [path for name in restored for path, e in saved[name].items()
               if got[name].get(path) != e["checksum"]]
        if bad:
            raise self._corrupt(step, f"{len(bad)} array(s) fail their checksums, e.g. {bad[:3]}")

    def _params_target(self, step: int) -> Any:
        """ShapeDtypeStructs on this host's first device, from the saved metadata."""
        host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            meta = self._manager.item_metadata(step)["params"]
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for unreadable metadata
            raise self._corrupt(step, f"its metadata cannot be read ({_brief(e)})") from None
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), meta)

    def _corrupt(self, step: int, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {why}")

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            path = self._step_path(step)
            if path.is_dir():
                path.rename(path.parent / f"{step}.corrupt-{int(time.time())}")
        self._manager.reload()


def _set_aside_unlistable_steps(directory: str) -> None:
    """Rename (with a warning) the steps whose Orbax bookkeeping files cannot be parsed: Orbax
    reads them all when it opens a directory and fails as a whole on any one of them, so
    such a step would make every checkpoint of the run unreachable, for readers too."""
    if "://" in directory:  # local directories only: a bucket is not listed here
        return
    root = epath.Path(directory)
    if jax.process_index() != 0 or not root.is_dir():
        return
    for step_dir in root.iterdir():
        if not step_dir.name.isdigit() or not step_dir.is_dir():
            continue
        for name in ("_CHECKPOINT_METADATA", "metrics/metrics"):
            file = step_dir / name
            try:
                if file.exists():
                    json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                aside = root / f"{step_dir.name}.corrupt-{int(time.time())}"
                warnings.warn(f"checkpoint step {step_dir.name} in {directory} is damaged: {name} "
                              f"cannot be parsed ({_brief(e)}); set aside as {aside.name}", stacklevel=3)
                step_dir.rename(aside)
                break


# ------------------------------------------------------------------------ checksums


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words: one per element of <= 4 bytes, two of 8 bytes."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def leaf_checksum(x: jax.Array) -> jax.Array:
    """Checksum of one array's values: uint32[2], two independent 32-bit sums over elements.

    Element i (row-major flat index, in the uint32 words of `_words`) with bits b adds
    fmix32(b ^ fmix32(i)) to the first lane and fmix32((b ^ fmix32(i ^ 0x9E3779B9)) *
    0x27D4EB2F) to the second, modulo 2**32. fmix32 is a bijection, so changing any one
    element always changes both lanes; the sums are independent of how the array is
    sharded, so every process of a run computes the same value.
    """
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    for d in range(w.ndim):  # flat index from per-axis iotas: sharding-friendly, no reshape
        stride = int(np.prod(w.shape[d + 1:], dtype=np.uint64) % (1 << 32))
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
    a = _fmix32(w ^ _fmix32(index))
    b = _fmix32((w ^ _fmix32(index ^ jnp.uint32(0x9E3779B9))) * jnp.uint32(0x27D4EB2F))
    return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


@jax.jit
def _digest_leaves(leaves):
    sums = [leaf_checksum(x) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True), sums


def tree_checksums(tree: Any) -> dict[str, str]:
    """{jax.tree_util.keystr(path): 16 hex digits of `leaf_checksum`} for the array leaves."""
    return _digest({"": tree})[1][""]


def _digest(items: dict[str, Any]) -> tuple[bool, dict[str, dict[str, str]]]:
    """(every float finite?, {item: {path: checksum hex}}) in one jitted call."""
    paths, leaves = [], []
    for name, tree in items.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            paths.append((name, jax.tree_util.keystr(path)))
            leaves.append(jnp.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf)
    if not leaves:
        return True, {name: {} for name in items}
    finite, sums = jax.device_get(_digest_leaves(leaves))
    out: dict[str, dict[str, str]] = {name: {} for name in items}
    for (name, path), s in zip(paths, sums):
        out[name][path] = f"{int(s[0]):08x}{int(s[1]):08x}"
    return bool(finite), out


def _leaf_specs(tree: Any) -> list[tuple[str, tuple, str]]:
    """(path, shape, dtype name) of each leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return [(jax.tree_util.keystr(p), tuple(np.shape(x)), _dtype_name(x))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _seal(items: dict[str, Any], checksums: dict[str, dict[str, str]]) -> dict:
    """The manifest: per item and array path, shape, dtype and checksum, sealed by a SHA-256."""
    entries = {name: {path: {"shape": list(shape), "dtype": dtype, "checksum": checksums[name][path]}
                      for path, shape, dtype in _leaf_specs(tree)}
               for name, tree in items.items()}
    return {"version": _MANIFEST_VERSION, "items": entries, "sha256": _sha256(entries)}


def _dtype_name(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    return str(dtype if dtype is not None else np.asarray(x).dtype)


def _sealed_ok(manifest: Any) -> bool:
    if not (isinstance(manifest, dict) and manifest.get("version") == _MANIFEST_VERSION
            and isinstance(manifest.get("items"), dict)):
        return False
    return manifest.get("sha256") == _sha256(manifest["items"])


def _sha256(items: dict) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------ disk full


class _DropDiskFull(logging.Filter):
    """Drops Orbax's log records (with their tracebacks) of a full disk: DiskFullError says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not ("No space left on device" in text or "os_error_code='28'" in text)


_DISK_FULL_FILTER = _DropDiskFull()


def _quiet_disk_full_logs() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _DISK_FULL_FILTER not in logger.filters:
            logger.addFilter(_DISK_FULL_FILTER)
    if not getattr(sys.unraisablehook, "_drops_closed_loop_callbacks", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _drop_closed_loop_callbacks(previous):
    """sys.unraisablehook without the "Event loop is closed" errors of tensorstore's late
    callbacks.

    When one write or read of an Orbax batch fails (a full disk, a damaged file), Orbax
    closes the batch's asyncio loop while tensorstore still completes the others; each
    completion calls back into the closed loop from C++, which reports a traceback per
    array. They come after the error this module reports and add nothing. Only errors
    raised directly by `call_soon_threadsafe` called from outside Python are dropped.
    """
    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and frames and frames[0].name == "call_soon_threadsafe"):
            return
        previous(unraisable)

    hook._drops_closed_loop_callbacks = True
    return hook


# ------------------------------------------------------------------------ helpers


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _resolve_directory(directory: str | os.PathLike) -> str:
    """`directory` as a string: local paths made absolute, URLs ("gs://bucket/run", any path
    containing "://") left untouched, as Orbax opens them through etils.epath."""
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(directory)


def abstract_state(state: Any, shardings: Any = None) -> Any:
    """jax.ShapeDtypeStruct leaves for `state` (arrays or ShapeDtypeStructs), placed on
    `shardings` (a matching tree) or, if None, on each leaf's own sharding / device 0."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _val_loss(metrics: dict) -> float:
    return metrics.get("val_loss", math.inf)
