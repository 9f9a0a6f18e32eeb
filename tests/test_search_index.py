"""VectorIndex: exact top-k against brute-force float64 NumPy, chunked, sharded, saved and loaded."""
import os

import jax
import numpy as np
import pytest

from transformer_jax.search import ModelStamp, VectorIndex
from transformer_jax.search import index as index_module


def brute_force(queries, corpus, k, metric="ip"):
    """float64 scores; order by score descending, then by row ascending (the index's tie rule)."""
    q, x = queries.astype(np.float64), corpus.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = q @ x.T
    rows = np.stack([np.lexsort((np.arange(len(x)), -s))[:k] for s in scores])
    return np.take_along_axis(scores, rows, axis=1), rows


def integer_vectors(rng, n, d=12):
    """Small integers: every dot product is exact in float32, and many are tied."""
    return rng.integers(-2, 3, (n, d)).astype(np.float32)


# many chunks / one chunk with padding rows / one chunk without (no mask, no merge)
@pytest.mark.parametrize("chunk_size, rows", [(8, 203), (1 << 14, 203), (1 << 14, 200)])
def test_top_k_equals_brute_force_with_ties(chunk_size, rows):
    rng = np.random.default_rng(1)
    corpus, queries = integer_vectors(rng, rows), integer_vectors(rng, 6)
    index = VectorIndex(corpus, metric="ip", chunk_size=chunk_size)
    assert index._placed()[3] == (rows % 8 != 0)  # whether the placed corpus has padding rows
    for k in (1, 9, rows):
        scores, ids = index.search(queries, k)
        want_scores, want_rows = brute_force(queries, corpus, k)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        np.testing.assert_array_equal(ids, want_rows)
        np.testing.assert_array_equal(scores, want_scores)


def test_cosine_on_random_vectors_and_query_blocks(monkeypatch):
    monkeypatch.setattr(index_module, "QUERY_BLOCK", 4)  # 11 queries: blocks of 4, 4, 3 (padded to 4)
    rng = np.random.default_rng(2)
    corpus = rng.standard_normal((300, 24)).astype(np.float32) * rng.uniform(0.1, 10, (300, 1)).astype(np.float32)
    queries = rng.standard_normal((11, 24)).astype(np.float32)
    scores, ids = VectorIndex(corpus, metric="cosine", chunk_size=64).search(queries, 5)
    want_scores, want_rows = brute_force(queries, corpus, 5, "cosine")
    np.testing.assert_array_equal(ids, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=2e-6)
    one_score, one_id = VectorIndex(corpus, metric="cosine").search(queries[3], 5)  # a [d] query
    np.testing.assert_array_equal(one_id, want_rows[3:4])


# 30: fewer rows per device (4) than k; 203: padding on several devices; 256: 32 rows a device,
# with chunks of 8 no padding at all (no mask)
@pytest.mark.parametrize("rows", [30, 203, 256])
def test_sharded_over_eight_devices_equals_one_device(rows):
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(3)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    # integers: exact scores, many ties, many chunks; normal: rounding, one chunk larger than a
    # device's share, so bit equality needs the mesh to sum the very chunks one device sums
    for corpus, queries, chunk_size in [(integer_vectors(rng, rows), integer_vectors(rng, 5), 8),
                                        (rng.standard_normal((rows, 12)), rng.standard_normal((5, 12)), 4096)]:
        single = VectorIndex(corpus, metric="ip", chunk_size=chunk_size).search(queries, 10)
        sharded_index = VectorIndex(corpus, metric="ip", chunk_size=chunk_size, mesh=mesh)
        sharded = sharded_index.search(queries, 10)
        np.testing.assert_array_equal(sharded[1], single[1])
        np.testing.assert_array_equal(sharded[0], single[0])  # bit for bit
        np.testing.assert_array_equal(sharded[1], brute_force(queries, corpus, 10)[1])
    placed = sharded_index._placed()[0]
    assert len(placed.sharding.device_set) == 8 and placed.addressable_shards[0].data.shape[0] < placed.shape[0]


def test_add_ids_and_texts():
    rng = np.random.default_rng(4)
    a, b, queries = integer_vectors(rng, 20), integer_vectors(rng, 7), integer_vectors(rng, 3)
    index = VectorIndex(a, ids=[f"a{i}" for i in range(20)], texts=[f"text {i}" for i in range(20)], metric="ip")
    index.add(b, ids=[f"b{i}" for i in range(7)], texts=[f"more {i}" for i in range(7)])
    assert len(index) == 27 and index.texts[20] == "more 0"
    _, rows = brute_force(queries, np.concatenate([a, b]), 6)
    _, ids = index.search(queries, 6)
    np.testing.assert_array_equal(ids, np.asarray(index.ids, dtype=object)[rows])
    numbered = VectorIndex(a, metric="ip")
    numbered.add(b)
    assert numbered.ids == list(range(27))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(b[:1], ids=["a3"], texts=["x"])
    with pytest.raises(ValueError, match="str ids"):
        index.add(b[:1], texts=["x"])
    with pytest.raises(ValueError, match="stores texts"):
        index.add(b[:1], ids=["c"])
    with pytest.raises(TypeError, match="mix"):
        index.add(b[:1], ids=[5], texts=["x"])


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    corpus, queries = rng.standard_normal((40, 16)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    stamp = ModelStamp("tiny", "ab" * 32, path="/models/tiny")
    index = VectorIndex(corpus, ids=[f"doc/{i}.txt" for i in range(40)],
                        texts=[f"ünïcode {i}\n" for i in range(40)], model=stamp)
    path = tmp_path / "corpus.index"
    index.save(path)
    assert os.listdir(tmp_path) == ["corpus.index"]  # the temporary file was renamed away
    loaded = VectorIndex.load(path, model=stamp)
    assert (loaded.ids, loaded.texts, loaded.model, loaded.metric) == (index.ids, index.texts, stamp, "cosine")
    np.testing.assert_array_equal(loaded.embeddings, corpus)
    for got, want in zip(loaded.search(queries, 4), index.search(queries, 4)):
        np.testing.assert_array_equal(got, want)
    ints = VectorIndex(corpus, metric="ip")
    ints.save(path)  # overwrites
    assert VectorIndex.load(path).ids == list(range(40)) and VectorIndex.load(path).texts is None


def test_truncated_or_foreign_index_file(tmp_path):
    rng = np.random.default_rng(6)
    stamp = ModelStamp("model-a", "aa" * 32)
    path = tmp_path / "a.index"
    VectorIndex(rng.standard_normal((50, 8)), model=stamp).save(path)
    with pytest.raises(ValueError, match="model-a.*not 'model-b'"):
        VectorIndex.load(path, model=ModelStamp("model-b", "bb" * 32))

    class OtherEncoder:
        stamp = ModelStamp("model-b", "bb" * 32)

        def encode(self, texts, **kwargs):
            raise AssertionError("the model check comes before encoding")
    with pytest.raises(ValueError, match="built with model 'model-a'"):
        VectorIndex.load(path).search_texts(OtherEncoder(), ["query"], 3)
    data = path.read_bytes()
    (tmp_path / "cut.index").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        VectorIndex.load(tmp_path / "cut.index")
    (tmp_path / "empty.index").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        VectorIndex.load(tmp_path / "empty.index")
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "missing.index")


def test_bad_inputs():
    rng = np.random.default_rng(7)
    corpus = rng.standard_normal((5, 4)).astype(np.float32)
    index = VectorIndex(corpus)
    with pytest.raises(ValueError, match="embeddings is empty"):
        VectorIndex(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="queries is empty"):
        index.search(np.zeros((0, 4), np.float32), 1)
    with pytest.raises(ValueError, match="k=6 is larger than the corpus"):
        index.search(corpus[:1], 6)
    with pytest.raises(ValueError, match="k=0"):
        index.search(corpus[:1], 0)
    with pytest.raises(ValueError, match=r"expected dim 4"):
        index.search(np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match="row 1 holds a non-finite"):
        index.search(np.array([[1, 2, 3, 4], [np.nan, 0, 0, 0]]), 1)
    with pytest.raises(ValueError, match="row 2 is all zeros"):
        VectorIndex(np.eye(4)[[0, 1, 1, 1]] * [[1], [1], [0], [1]])
    with pytest.raises(ValueError, match="metric='l2'"):
        VectorIndex(corpus, metric="l2")
    with pytest.raises(TypeError, match="dtype <U"):
        VectorIndex(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="ids has 2 items for 5 rows"):
        VectorIndex(corpus, ids=[1, 2])
    with pytest.raises(ValueError, match="texts must be 5 strings"):
        VectorIndex(corpus, texts=["a"])
