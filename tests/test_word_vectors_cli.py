"""`train.py --objective cbow|skipgram|glove`: the word-vector runs from the command line."""
import numpy as np
import pytest

import train
from test_word_vectors_run import planted_corpus
from transformer_jax.word_vectors import KeyedVectors, load_word_vectors


@pytest.mark.parametrize("objective", ["cbow", "glove"])
def test_command_line_run_writes_vectors_txt(tmp_path, objective):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(planted_corpus(2, 200))
    out = tmp_path / "run"
    assert train.main(["--objective", objective, "--data", str(corpus), "--out-dir", str(out), "--dimension", "8",
                       "--window", "2", "--min-count", "1", "--epochs", "2", "--batch-size", "64"]) == 0
    written = KeyedVectors.load_word2vec_format(out / "vectors.txt")
    words = {w for line in corpus.read_text().split("\n") for w in line.split()}
    assert set(written.words) == words and written.vectors.shape == (len(words), 8)
    np.testing.assert_allclose(written.vectors, load_word_vectors(out).vectors, rtol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--objective", "skipgram", "--preset", "tiny"], "--preset: not used by --objective skipgram"),
    (["--dimension", "8"], "--dimension: only for the word-vector objectives"),
    (["--objective", "glove", "--no-lowercase", "--seq-len", "8"], "--seq-len: not used"),
])
def test_flags_of_the_other_kind_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        train.main(argv)


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_the_run_directory_rules_apply_from_the_command_line(tmp_path, flag):
    (tmp_path / "notes.txt").write_text("mine\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(planted_corpus(2, 20))
    with pytest.raises(ValueError, match="is not empty and holds no run"):  # --overwrite is taken, too
        train.main(["--objective", "glove", "--data", str(corpus), "--out-dir", str(tmp_path), *flag])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "notes.txt"]
