"""VectorIndex: exact nearest-neighbour search over embeddings, saved atomically with its model's stamp.

    index = VectorIndex(embeddings, texts=docs, metric="cosine", model=encoder.stamp)
    scores, ids = index.search(encoder.encode(["read a compressed file"]), k=5)
    index.save("docs.index")      # one .npz file, written to a temporary name and renamed
    index = VectorIndex.load("docs.index", model=encoder.stamp)  # refuses another model

The search is exact (every corpus row is scored) and runs in JAX in chunks
(`topk.py`); given a mesh, the corpus is split over its devices.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import zipfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from transformer_jax.search import topk

METRICS = ("ip", "cosine")
FORMAT = "transformer_jax.VectorIndex/1"
# Queries are scored this many at a time (padded to a power of two, so that query
# counts compile a handful of shapes); with the default chunk the score block of one
# step is 1024 x 16384 float32 = 64 MiB.
QUERY_BLOCK = 1024
DEFAULT_CHUNK = 16384


@dataclasses.dataclass(frozen=True)
class ModelStamp:
    """Which model made the embeddings: a name for people, a hash of its weights for checks."""

    name: str
    weights_sha256: str
    path: str | None = None  # where the model was loaded from, for the command line

    def same_model(self, other: ModelStamp) -> bool:
        return self.weights_sha256 == other.weights_sha256


class VectorIndex:
    """Embeddings [n, d] with ids (and optional texts), searchable by exact top-k.

    Args:
      embeddings: float [n, d], n >= 1, finite.
      ids: n distinct ints or strs (default 0..n-1).
      texts: n strings shown with the results (optional).
      metric: "ip" (inner product) or "cosine" (rows and queries L2-normalised).
      model: the ModelStamp of the encoder that made the embeddings (optional); queries
        through `search_texts` and `load(..., model=...)` must come from the same weights.
      mesh: split the corpus rows over every device of this mesh.
      chunk_size: corpus rows scored per step (memory bound: QUERY_BLOCK x chunk_size floats).
    """

    def __init__(self, embeddings: np.ndarray, *, ids: Sequence[int | str] | None = None,
                 texts: Sequence[str] | None = None, metric: str = "cosine",
                 model: ModelStamp | None = None, mesh: Mesh | None = None,
                 chunk_size: int = DEFAULT_CHUNK):
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int")
        if model is not None and not isinstance(model, ModelStamp):
            raise TypeError(f"model must be a ModelStamp or None, got {type(model).__name__}")
        embeddings = _check_matrix(embeddings, "embeddings", dim=None)
        self.metric = metric
        self.model = model
        self.mesh = mesh
        self.chunk_size = chunk_size
        self._vectors = np.zeros((0, embeddings.shape[1]), np.float32)
        self._ids: list = []
        self._id_set: set = set()
        self._texts: list[str] | None = None if texts is None else []
        self._device: tuple | None = None
        self._searchers: dict = {}
        self._id_cache: np.ndarray | None = None
        self.add(embeddings, ids=ids, texts=texts)

    # ------------------------------------------------------------------ contents

    def __len__(self) -> int:
        return self._vectors.shape[0]

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    @property
    def embeddings(self) -> np.ndarray:
        """float32 [n, d], as given (not normalised). Read-only view."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> list:
        return list(self._ids)

    @property
    def texts(self) -> list[str] | None:
        return None if self._texts is None else list(self._texts)

    def add(self, embeddings: np.ndarray, *, ids: Sequence[int | str] | None = None,
            texts: Sequence[str] | None = None) -> None:
        """Append rows: embeddings [a, d] (a >= 1), with ids and texts as the constructor's."""
        embeddings = _check_matrix(embeddings, "embeddings", dim=self.dim)
        a = embeddings.shape[0]
        if ids is None:
            if self._ids and isinstance(self._ids[0], str):
                raise ValueError("ids=None: this index has str ids; pass ids for the new rows")
            start = (max(self._ids) + 1) if self._ids else 0
            ids = list(range(start, start + a))
        else:
            ids = _check_ids(ids, a, self._ids[:1], self._id_set)
        if texts is None and self._texts is not None:
            raise ValueError("texts=None: this index stores texts; pass one per new row")
        if texts is not None:
            if self._texts is None:
                raise ValueError("texts given, but this index was built without texts")
            texts = list(texts)
            if len(texts) != a or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"texts must be {a} strings (one per row), got {len(texts)} items")
        if self.metric == "cosine" and not np.all(np.linalg.norm(embeddings, axis=1) > 0):
            bad = int(np.flatnonzero(np.linalg.norm(embeddings, axis=1) == 0)[0])
            raise ValueError(f"embeddings row {bad} is all zeros: it has no direction for metric='cosine'")
        self._vectors = np.concatenate([self._vectors, embeddings])
        self._ids.extend(ids)
        self._id_set.update(ids)
        if texts is not None:
            self._texts.extend(texts)
        self._device = self._id_cache = None  # rebuilt on the next search

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k for each query.

        queries: float [m, d] (or [d] for one query), m >= 1, finite.
        Returns scores float32 [m, k] (descending; inner product, or cosine similarity)
        and ids [m, k] (this index's ids; int64, or str). Ties: the earlier-added row first.
        """
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None]
        queries = _check_matrix(queries, "queries", dim=self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r}: expected a positive int")
        if k > len(self):
            raise ValueError(f"k={k} is larger than the corpus ({len(self)} rows)")
        if self.metric == "cosine":
            queries = _normalise(queries, "queries")
        run = self._searcher(int(k))
        m = queries.shape[0]
        if m <= QUERY_BLOCK:  # one block: no slicing or concatenating (one query's latency)
            scores, rows = run(queries)
        else:
            blocks = [run(queries[start:start + QUERY_BLOCK]) for start in range(0, m, QUERY_BLOCK)]
            scores = np.concatenate([s for s, _ in blocks])
            rows = np.concatenate([r for _, r in blocks])
        return scores, self._id_array()[rows]

    def search_texts(self, encoder, texts: Sequence[str], k: int, **encode_kwargs
                     ) -> tuple[np.ndarray, np.ndarray]:
        """`search(encoder.encode(texts), k)`, after checking that `encoder` made this index."""
        self.check_model(encoder.stamp)
        return self.search(encoder.encode(texts, **encode_kwargs), k)

    def check_model(self, stamp: ModelStamp) -> None:
        """Raise ValueError unless `stamp` names the weights this index was built with."""
        if self.model is None:
            return
        if not stamp.same_model(self.model):
            raise ValueError(
                f"this index was built with model {self.model.name!r} (weights sha256 "
                f"{self.model.weights_sha256[:12]}...), not {stamp.name!r} (weights sha256 "
                f"{stamp.weights_sha256[:12]}...): query it with the same model, or rebuild it")

    def _id_array(self) -> np.ndarray:
        """The ids as an array (int64, or object for str ids), cached until the next add."""
        if self._id_cache is None:
            is_str = bool(self._ids) and isinstance(self._ids[0], str)
            self._id_cache = np.asarray(self._ids, dtype=object if is_str else np.int64)
        return self._id_cache

    def _placed(self) -> tuple[jax.Array, jax.Array, int, bool]:
        """The corpus on the device(s), normalised for cosine and padded to whole chunks:
        (corpus, number of real rows, chunk, whether any row is padding). Placed once and
        kept until the next add, so a search moves only its queries to the device."""
        if self._device is None:
            vectors = _normalise(self._vectors, "embeddings") if self.metric == "cosine" else self._vectors
            devices = 1 if self.mesh is None else self.mesh.devices.size
            chunk, per_device = topk.padded_layout(len(self), self.chunk_size, devices)
            padded = topk.pad_rows(vectors, per_device * devices)
            placed = (jax.device_put(padded) if self.mesh is None
                      else jax.device_put(padded, topk.corpus_sharding(self.mesh)))
            self._device = (placed, jnp.int32(len(self)), chunk, per_device * devices > len(self))
            self._searchers = {}
        return self._device

    def _searcher(self, k: int):
        """queries float32 [b, d] (b <= QUERY_BLOCK) -> (scores [b, k], rows [b, k]) as NumPy,
        one per k, kept until the next add. A block is padded to a power of two rows, so
        query counts compile a handful of shapes."""
        corpus, num_rows, chunk, padded = self._placed()
        run = self._searchers.get(k)
        if run is None:
            if self.mesh is None:
                top = functools.partial(topk.top_k_single, k=k, chunk=chunk, padded=padded)
            else:
                top = functools.partial(topk.top_k_sharded, k=k, chunk=chunk, mesh=self.mesh,
                                        padded=padded)

            def run(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                rows = block.shape[0]
                size = 1 << (rows - 1).bit_length()
                scores, found = top(topk.pad_rows(block, size), corpus, num_rows)
                scores, found = np.asarray(scores), np.asarray(found)
                return (scores, found) if size == rows else (scores[:rows], found[:rows])
            self._searchers[k] = run
        return run

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to `path` (one .npz file): to a temporary file in the same
        directory, then renamed, so `path` is never half-written."""
        path = os.fspath(path)
        meta = {
            "format": FORMAT, "metric": self.metric, "rows": len(self), "dim": self.dim,
            "model": None if self.model is None else dataclasses.asdict(self.model),
            "embeddings_sha256": _sha256(self._vectors),
            "id_kind": "int" if self._id_array().dtype == np.int64 else "str",
        }
        arrays = {"embeddings": self._vectors, "meta": _utf8(json.dumps(meta))}
        if meta["id_kind"] == "int":
            arrays["ids"] = np.asarray(self._ids, np.int64)
        else:
            arrays["ids"] = _utf8(json.dumps([str(i) for i in self._ids]))
        if self._texts is not None:
            arrays["texts"] = _utf8(json.dumps(self._texts, ensure_ascii=False))
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: ModelStamp | None = None,
             mesh: Mesh | None = None, chunk_size: int = DEFAULT_CHUNK) -> VectorIndex:
        """Read an index written by `save`. With `model`, raise ValueError unless the index
        was built with the same weights. A truncated or corrupt file is a ValueError."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no index file at {path!r}")
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in f.files}
            meta = json.loads(_text(arrays["meta"]))
        except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} is not a readable index file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
        vectors = arrays["embeddings"]
        if vectors.shape != (meta["rows"], meta["dim"]) or _sha256(vectors) != meta["embeddings_sha256"]:
            raise ValueError(f"{path!r}: the embeddings do not match their recorded shape and checksum "
                             "(the file is corrupt)")
        ids = (arrays["ids"].tolist() if meta["id_kind"] == "int" else json.loads(_text(arrays["ids"])))
        texts = json.loads(_text(arrays["texts"])) if "texts" in arrays else None
        stamp = None if meta["model"] is None else ModelStamp(**meta["model"])
        index = cls(vectors, ids=ids, texts=texts, metric=meta["metric"], model=stamp, mesh=mesh,
                    chunk_size=chunk_size)
        if model is not None:
            index.check_model(model)
        return index


# ---------------------------------------------------------------------- helpers


def _check_matrix(x, name: str, dim: int | None) -> np.ndarray:
    """x as a finite float32 [n, d] array with n >= 1 (and d == dim if given)."""
    try:
        x = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - ragged lists etc.
        raise TypeError(f"{name} must be a float array [rows, dim]: {e}") from None
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must be a float array [rows, dim], got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be [rows, dim], got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}): expected at least one row")
    if x.shape[1] == 0 or (dim is not None and x.shape[1] != dim):
        expected = "dim >= 1" if dim is None else f"dim {dim} (the index's)"
        raise ValueError(f"{name} has shape {x.shape}: expected {expected}")
    x = np.ascontiguousarray(x, np.float32)
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"{name} row {row} holds a non-finite value")
    return x


def _check_ids(ids, count: int, first: list, existing: set) -> list:
    """ids as a list of `count` distinct ints or strs, none in `existing`, of the same kind
    as `first` (the index's first id, if any)."""
    ids = list(ids)
    if len(ids) != count:
        raise ValueError(f"ids has {len(ids)} items for {count} rows")
    if not all(isinstance(i, (int, np.integer, str)) and not isinstance(i, bool) for i in ids):
        raise TypeError("ids must be ints or strs")
    ids = [int(i) if isinstance(i, np.integer) else i for i in ids]
    kinds = {isinstance(i, str) for i in [*first, *ids]}
    if len(kinds) > 1:
        raise TypeError("ids must be all ints or all strs, not a mix")
    seen: set = set()
    for i in ids:
        if i in existing or i in seen:
            raise ValueError(f"id {i!r} is already in the index (ids must be distinct)")
        seen.add(i)
    return ids


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError(f"{name} row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros: "
                         "it has no direction for metric='cosine'")
    return (x / norms).astype(np.float32)


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def _text(array: np.ndarray) -> str:
    return array.tobytes().decode("utf-8")
