"""KeyedVectors queries against brute force, the word2vec formats against hand-written
bytes, and the word-vector sentence encoder against its formula."""
import struct

import numpy as np
import pytest

from transformer_jax.word_vectors.keyed_vectors import KeyedVectors, UnknownWordError
from transformer_jax.word_vectors.sentence import WordVectorEncoder
from transformer_jax.word_vectors.word2vec_format import load_word2vec, save_word2vec


def _random_kv(seed=0, v=40, d=6, counts=False):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(v)]
    return KeyedVectors(words, rng.normal(size=(v, d)),
                        rng.integers(1, 100, v) if counts else None)


def test_binary_format_reads_and_writes_the_hand_written_bytes(tmp_path):
    vectors = np.array([[1.0, -2.5], [0.125, 3e-3]], dtype=np.float32)
    expected = (b"2 2\n" + "a".encode() + b" " + struct.pack("<2f", 1.0, -2.5) + b"\n"
                + "bé".encode() + b" " + struct.pack("<2f", 0.125, np.float32(3e-3)) + b"\n")
    path = tmp_path / "v.bin"
    save_word2vec(path, ["a", "bé"], vectors, binary=True)
    assert path.read_bytes() == expected
    # gensim writes no newline after a vector: read that form too
    (tmp_path / "g.bin").write_bytes(expected.replace(b"\nb", b"b").rstrip(b"\n"))
    for p in (path, tmp_path / "g.bin"):
        words, got = load_word2vec(p, binary=True)
        assert words == ["a", "bé"]
        np.testing.assert_array_equal(got, vectors)


def test_text_format_reads_and_writes_the_hand_written_text(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("2 3\nfoo 1 2.5 -3\nbär 0.1 0 0.001\n", encoding="utf-8")
    words, vectors = load_word2vec(path)
    assert words == ["foo", "bär"]
    np.testing.assert_array_equal(vectors, np.array([[1, 2.5, -3], [0.1, 0, 0.001]], np.float32))
    save_word2vec(tmp_path / "out.txt", words, vectors)
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "2 3\nfoo 1.0 2.5 -3.0\nbär 0.1 0.0 0.001\n"


@pytest.mark.parametrize("binary", [False, True])
def test_round_trip_is_exact(tmp_path, binary):
    kv = _random_kv(1)
    kv.save_word2vec_format(tmp_path / "v", binary=binary)
    back = KeyedVectors.load_word2vec_format(tmp_path / "v", binary=binary)
    assert back.words == kv.words
    np.testing.assert_array_equal(back.vectors, kv.vectors)


def test_malformed_files_and_words_are_refused(tmp_path):
    (tmp_path / "bad.txt").write_text("3 2\na 1 2\n")
    with pytest.raises(ValueError, match="announces 3 words"):
        load_word2vec(tmp_path / "bad.txt")
    (tmp_path / "bad.bin").write_bytes(b"1 4\na " + b"\0" * 7)
    with pytest.raises(ValueError, match="truncated"):
        load_word2vec(tmp_path / "bad.bin", binary=True)
    with pytest.raises(ValueError, match="whitespace"):
        save_word2vec(tmp_path / "x", ["a b"], np.zeros((1, 2)))


def test_similarity_most_similar_and_analogy_match_brute_force():
    kv = _random_kv(2)
    x = kv.vectors.astype(np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert kv.similarity("w3", "w7") == pytest.approx(unit[3] @ unit[7], rel=1e-5)
    scores = unit @ unit[5]
    scores[5] = -np.inf
    order = np.argsort(-scores)[:4]
    got = kv.most_similar("w5", k=4)
    assert [w for w, _ in got] == [f"w{i}" for i in order]
    np.testing.assert_allclose([s for _, s in got], scores[order], rtol=1e-5)
    q = unit[1] - unit[2] + unit[3]
    scores = unit @ (q / np.linalg.norm(q))
    scores[[1, 2, 3]] = -np.inf
    assert kv.analogy("w1", "w2", "w3", k=2)[0][0] == f"w{np.argmax(scores)}"


def test_unknown_word_is_a_clear_error():
    kv = _random_kv(3)
    with pytest.raises(KeyError, match="'nope' is not in the vocabulary"):
        kv.most_similar("nope")
    with pytest.raises(ValueError, match="nope"):
        kv.analogy("w1", "nope", "w2")
    assert issubclass(UnknownWordError, ValueError)
    with pytest.raises(ValueError, match="k must be"):
        kv.most_similar("w1", k=0)


def test_sentence_encoder_mean_and_sif_match_the_formula():
    kv = _random_kv(4, counts=True)
    texts = ["W1 w2 unknown w2", "nothing known here", "w7"]
    plain = WordVectorEncoder(kv).encode(texts, batch_size=2)
    v = kv.vectors.astype(np.float64)
    np.testing.assert_allclose(plain[0], (v[1] + 2 * v[2]) / 3, rtol=1e-6)
    np.testing.assert_array_equal(plain[1], 0.0)
    a = 1e-2
    p = kv.counts / kv.counts.sum()
    sif = WordVectorEncoder(kv, sif=a)
    got = sif.encode(texts, batch_size=1)
    w = a / (a + p)
    np.testing.assert_allclose(got[0], (w[1] * v[1] + 2 * w[2] * v[2]) / 3, rtol=1e-5)
    np.testing.assert_array_equal(got, sif.encode(texts, batch_size=3))
    sif.fit_common_component(texts)
    u = sif.common_component
    removed = sif.encode(texts)
    np.testing.assert_allclose(removed @ u, 0.0, atol=1e-5)
    assert np.linalg.norm(WordVectorEncoder(kv, normalize=True).encode(texts)[0]) == pytest.approx(1.0)
    with pytest.raises(TypeError, match="not one str"):
        sif.encode("w1")
    with pytest.raises(ValueError, match="sif weighting needs word counts"):
        WordVectorEncoder(_random_kv(5), sif=1e-3)
