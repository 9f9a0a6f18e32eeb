"""The safetensors format, read one tensor at a time and written as a stream.

A file is: 8 bytes (little-endian u64) N, N bytes of JSON mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets into the data that follows;
an optional "__metadata__" of strings), then the data. This module parses the header
itself and reads a tensor two ways (`TensorSource`):
- `view`: an array on one read-only memory map of its file, nothing read until used. On a
  CPU backend `jax.device_put` aliases a host array whose data is `ALIGNMENT`-aligned
  instead of copying it, so a float32 tensor stored as the model wants it at such an
  offset becomes a parameter that *is* the file's pages (as transformers' lazy loading
  does). The file must then not be truncated or rewritten in place while those
  parameters live (replacing it, as `write_file` does, is safe).
- `read_into`: plain reads into an array the caller owns (`host_empty` gives one that
  device_put aliases). Used for every other tensor, so the pages read stay in the page
  cache and never count in the process's memory beside the converted copy.
The `safetensors` library is not used here (its NumPy side has no bfloat16, and its
writer needs every tensor in memory at once); it is the reference the tests check these
readers and writers against.

A sharded checkpoint is a `model.safetensors.index.json` whose "weight_map" names the
file of each tensor; `TensorSource` reads either layout, `write_checkpoint` writes either.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
ALIGNMENT = 64  # XLA's CPU client aliases host data aligned to 64 bytes (measured: 32 is copied)

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset(DTYPES[k] for k in ("F64", "F32", "F16", "BF16"))


class TensorInfo(NamedTuple):
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(file: str) -> dict[str, TensorInfo]:
    """The tensors of one safetensors `file`, checked against the file's size.

    Raises ValueError naming the file (and the tensor) when the header is malformed or
    the file is too short for a tensor (a truncated download).
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file!r} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(
                f"{file!r} is truncated or not a safetensors file: header of {n} bytes, file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file!r} has a malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file!r} has a malformed safetensors header (not a JSON object)")
    start, tensors = 8 + n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{file!r}: tensor {name!r} has a malformed header entry {entry!r} "
                f"(dtypes known: {sorted(DTYPES)})") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ValueError(
                f"{file!r}: tensor {name!r} {entry['dtype']}{list(shape)} spans bytes "
                f"[{begin}, {end}), which does not fit its shape")
        if start + end > size:
            raise ValueError(
                f"{file!r} is truncated: tensor {name!r} needs bytes up to {start + end}, "
                f"the file has {size}")
        tensors[name] = TensorInfo(file, dtype, shape, start + begin, start + end)
    return tensors


def host_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array in its own anonymous memory map: page-aligned (so
    `jax.device_put` on CPU aliases it), its pages faulted in by one `MAP_POPULATE` call
    (a fresh array is written once, and faulting it in page by page cost more than the
    copy into it: 300 MB, 0.15 s of CPU against 0.10 s populated, on a 2-core EPYC VM; fresh
    huge pages were slower still there, 0.5-0.6 s, only re-used ones cheap).
    Its memory is returned when the array is freed."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: an aligned slice of a NumPy array
        raw = np.empty(nbytes + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return raw[start:start + nbytes].view(dtype).reshape(shape)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype).reshape(shape)


class TensorSource:
    """The tensors of a checkpoint directory: one `model.safetensors` or a sharded index.

    `infos` maps each tensor name to its `TensorInfo` (headers only are read); `view` gives
    a tensor's bytes as an array on its file's memory map (one map per file, made on first
    use), `read_into` copies them into an array of the caller's.
    """

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{index!r} is not a safetensors index (no weight_map): {e}") from None
            self.infos: dict[str, TensorInfo] = {}
            for shard in sorted(set(weight_map.values())):
                path = os.path.join(directory, shard)
                if not os.path.isfile(path):
                    raise ValueError(f"{index!r} names the shard {shard!r}, which is missing")
                self.infos.update(read_header(path))
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise ValueError(f"{index!r} lists tensors its shards do not hold, e.g. {missing[:3]}")
        elif os.path.isfile(single):
            self.infos = read_header(single)
        else:
            raise ValueError(
                f"{directory!r} holds no weights: expected {SINGLE_FILE} or {INDEX_FILE} "
                "(PyTorch .bin checkpoints are not read: convert them to safetensors)")

        self._maps: dict[str, mmap.mmap] = {}

    def view(self, info: TensorInfo) -> np.ndarray:
        """The tensor `info` (little-endian, read-only) viewing its file's memory map: nothing
        is read until the array is used, and the map lives as long as any such array.

        Raises ValueError when the file is now shorter than the tensor's end (cut short
        since its header was read)."""
        count = math.prod(info.shape)
        if count == 0:
            return np.zeros(info.shape, info.dtype)
        mapped = self._maps.get(info.file)
        if mapped is None:
            with open(info.file, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[info.file] = mapped
        if len(mapped) < info.end:
            raise ValueError(f"{info.file!r} is truncated: a tensor at byte {info.begin} is cut short")
        return np.frombuffer(mapped, info.dtype.newbyteorder("<"), count, info.begin).reshape(info.shape)

    def read_into(self, info: TensorInfo, out: np.ndarray) -> np.ndarray:
        """Read the bytes of the tensor `info` into `out` (C-contiguous, of its byte size) with
        plain reads, which go through the page cache and leave no page of the file in the
        process's resident set, and return `out`. Raises ValueError when the file is cut short."""
        flat = out.reshape(-1).view(np.uint8)
        if flat.size != info.end - info.begin or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous array of {info.end - info.begin} bytes, got {out.nbytes}")
        view, done = memoryview(flat), 0
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.begin)
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{info.file!r} is truncated: a tensor at byte {info.begin} is cut short")
                done += n
        return out

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` (see `view`)."""
        return self.view(self.infos[name])


Tensors = Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's default
_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "TIB": 2**40, "GIB": 2**30, "MIB": 2**20,
          "KIB": 2**10, "B": 1}
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


def write_file(file: str, tensors: Tensors, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors `file` atomically, producing one tensor at a time.

    tensors: (name, shape, dtype, produce) with `produce()` returning that array; it is
    called once per tensor, while writing, so only one tensor is in host memory.
    """
    tmp = _write_tmp(file, tensors, metadata)
    os.replace(tmp, file)


def _write_tmp(file: str, tensors: Tensors, metadata: dict[str, str] | None = None) -> str:
    """Write the safetensors file `file` under a temporary name beside it; return that name."""
    # Whole multiples of ALIGNMENT first: the format allows no gaps, so one odd-sized tensor
    # would misalign every tensor after it, and those could no longer alias the file on load.
    tensors = sorted(tensors, key=lambda t: math.prod(t[1]) * np.dtype(t[2]).itemsize % ALIGNMENT != 0)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    # Padded (with spaces, as the library pads to 8) so the data starts `ALIGNMENT`-aligned:
    # tensors whose sizes are multiples of it then load without a copy (see `TensorSource.view`).
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    tmp = f"{file}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, shape, dtype, produce in tensors:
                array = np.ascontiguousarray(produce(), dtype=np.dtype(dtype).newbyteorder("<"))
                if array.shape != tuple(shape):
                    raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename that puts it in place
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def parse_size(max_shard_size: int | str) -> int:
    """Bytes of `max_shard_size`: a positive int, or a string such as "2GB", "500MB" (powers
    of 10, as Hugging Face reads them) or "1GiB" (powers of 2)."""
    if isinstance(max_shard_size, (int, np.integer)) and not isinstance(max_shard_size, bool):
        if max_shard_size > 0:
            return int(max_shard_size)
    elif isinstance(max_shard_size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]+)\s*", max_shard_size)
        if match and match.group(2).upper() in _UNITS and float(match.group(1)) > 0:
            return max(1, int(float(match.group(1)) * _UNITS[match.group(2).upper()]))
    raise ValueError(f"max_shard_size={max_shard_size!r}: expected a positive int (bytes) or a size such "
                     f"as '2GB', '500MB', '1GiB' (units {', '.join(_UNITS)})")


def plan_shards(tensors: list, max_bytes: int) -> list[list]:
    """Hugging Face's split, in order: a shard takes tensors while they fit in `max_bytes`;
    a tensor larger than that gets a shard of its own."""
    shards: list[list] = []
    current: list = []
    size = 0
    for t in tensors:
        nbytes = math.prod(t[1]) * np.dtype(t[2]).itemsize
        if nbytes > max_bytes:
            shards.append([t])
            continue
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_checkpoint(directory: str, tensors: Tensors, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Write `tensors` into `directory` as `model.safetensors`, or, when they exceed
    `max_shard_size`, as shards `model-00001-of-0000N.safetensors` with the index
    `model.safetensors.index.json` ({"metadata": {"total_parameters", "total_size"},
    "weight_map"}, sorted keys), the layout transformers writes. Returns the file names written.

    `stage_checkpoint` then `StagedCheckpoint.commit`: every file is written under a
    temporary name first (a failure meanwhile leaves the directory as it was), then the
    new weights are put in place (see `commit`).
    """
    staged = stage_checkpoint(directory, tensors, max_shard_size, metadata)
    try:
        return staged.commit()
    finally:
        staged.discard()


class StagedCheckpoint:
    """Weight files written under temporary names beside the names they will take."""

    def __init__(self, directory: str, staged: list[tuple[str, str]], names: list[str], old: set[str]):
        self.directory, self.names = directory, names
        self._staged, self._old = staged, old  # (temporary name, final name); the previous save's files

    def commit(self) -> list[str]:
        """Put the new weights in place, the file a reader opens first (the index, else
        model.safetensors) last, and remove the previous save's weight files the new one
        does not use, so the directory holds the old weights or the new ones, never a mix.
        (Where an old index names shards with the new names, it is removed before they are
        replaced: a crash in those few renames leaves no index, an error on loading, never
        a mix.) Returns the file names written."""
        index_file = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index_file) and set(self.names) & (self._old - {SINGLE_FILE, INDEX_FILE}):
            os.remove(index_file)  # it names files about to be replaced
        for tmp, final in self._staged:
            os.replace(tmp, final)
        if self.names == [SINGLE_FILE] and os.path.isfile(index_file):
            os.remove(index_file)  # a stale index would be read before model.safetensors
        for name in self._old - set(self.names) - {INDEX_FILE}:
            os.remove(os.path.join(self.directory, name))
        return self.names

    def discard(self) -> None:
        """Remove the temporary files not committed (after a failure)."""
        for tmp, _ in self._staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def stage_checkpoint(directory: str, tensors: Tensors, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     metadata: dict[str, str] | None = None) -> StagedCheckpoint:
    """Write the files of `write_checkpoint` under temporary names (nothing in `directory`
    changes yet); `commit` the result to put them in place. A failure removes them."""
    tensors = list(tensors)
    shards = plan_shards(tensors, parse_size(max_shard_size))
    old = _weight_files(directory)
    staged = StagedCheckpoint(directory, [], [], old)
    try:
        if len(shards) == 1:
            final = os.path.join(directory, SINGLE_FILE)
            staged._staged.append((_write_tmp(final, shards[0], metadata), final))
            staged.names.append(SINGLE_FILE)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                final = os.path.join(directory, name)
                staged._staged.append((_write_tmp(final, shard, metadata), final))
                staged.names.append(name)
                weight_map.update((t[0], name) for t in shard)
            metadata_ = {"total_parameters": sum(math.prod(t[1]) for t in tensors),
                         "total_size": sum(math.prod(t[1]) * np.dtype(t[2]).itemsize for t in tensors)}
            index_file = os.path.join(directory, INDEX_FILE)
            staged._staged.append((write_tmp_text(index_file, json.dumps(
                {"metadata": metadata_, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"), index_file))
    except BaseException:
        staged.discard()
        raise
    return staged


def write_tmp_text(file: str, text: str) -> str:
    """Write `text` to a temporary name beside `file` (flushed to disk); return that name."""
    tmp = f"{file}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def _weight_files(directory: str) -> set[str]:
    """The safetensors weight files of a previous save in `directory` (names only)."""
    if not os.path.isdir(directory):
        return set()
    return {f for f in os.listdir(directory) if f in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(f)}
