"""Word-vector runs end to end: learned vectors separate a planted structure, an
interrupted run resumes bit-identically, and bad settings fail clearly."""
import errno
import json
import os
import signal

import numpy as np
import pytest

from transformer_jax import checkpoint, run_dir
from transformer_jax.run_log import RunLog
from transformer_jax.word_vectors.config import WordVectorConfig
from transformer_jax.word_vectors.keyed_vectors import KeyedVectors
from transformer_jax.word_vectors.run import load_word_vectors, train_word_vectors


def planted_corpus(seed=0, sentences=1500):
    """Two groups of words, each seen only among its own group's context words."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(sentences):
        g = "ab"[rng.integers(2)]
        words = [f"{g}{rng.integers(6)}" if i % 2 == 0 else f"c{g}{rng.integers(6)}" for i in range(8)]
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def whole_steps(out_dir):
    return json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def _separation(kv: KeyedVectors) -> float:
    """Mean cosine within the planted groups minus mean cosine across them."""
    a = [f"a{i}" for i in range(6)]
    b = [f"b{i}" for i in range(6)]
    within = [kv.similarity(x, y) for g in (a, b) for x in g for y in g if x < y]
    across = [kv.similarity(x, y) for x in a for y in b]
    return float(np.mean(within) - np.mean(across))


@pytest.mark.parametrize("objective", ["skipgram", "cbow", "glove"])
def test_learned_vectors_separate_the_planted_groups(tmp_path, objective):
    glove = objective == "glove"  # ~290 co-occurrence entries: many small AdaGrad steps
    cfg = WordVectorConfig(objective=objective, dimension=16, window=2, negatives=3, min_count=1,
                           sample=0.0, epochs=150 if glove else 4, batch_size=64 if glove else 256,
                           learning_rate=0.05, log_every=10)
    kv = train_word_vectors(cfg, tmp_path, text=planted_corpus(), progress=False)
    assert _separation(kv) > 0.5
    back = load_word_vectors(tmp_path)
    assert back.words == kv.words
    np.testing.assert_array_equal(back.vectors, kv.vectors)
    np.testing.assert_array_equal(back.counts, kv.counts)
    assert os.path.isfile(tmp_path / "metrics.jsonl") and os.path.isfile(tmp_path / "vocab.txt")


@pytest.mark.parametrize("objective", ["skipgram", "glove"])
def test_interrupted_run_resumes_bit_identically(tmp_path, objective):
    cfg = WordVectorConfig(objective=objective, dimension=8, window=2, negatives=2, min_count=1,
                           epochs=2, batch_size=128 if objective == "skipgram" else 32,
                           log_every=1, checkpoint_every=1000)
    text = planted_corpus(1, 300)
    whole = train_word_vectors(cfg, tmp_path / "whole", text=text, progress=False)
    said = []
    part = train_word_vectors(cfg, tmp_path / "split", text=text, max_steps=3, progress=False,
                              say=said.append)
    total = whole_steps(tmp_path / "whole")
    assert total >= 6 and said == [f"stopped at step 3 of {total} (max_steps), saved: run again to continue"]
    assert not os.path.exists(tmp_path / "split" / "vectors.txt")
    assert not np.array_equal(part.vectors, whole.vectors)
    # then a SIGTERM while a step is logged (no periodic checkpoint there): it saves that step, says so
    said, stop = [], (3 + total) // 2
    with pytest.MonkeyPatch.context() as m:
        write = RunLog.write

        def log(self, record):
            if record["step"] == stop:
                signal.raise_signal(signal.SIGTERM)
            return write(self, record)

        m.setattr(RunLog, "write", log)
        train_word_vectors(cfg, tmp_path / "split", text=text, progress=False, say=said.append)
    assert said == [f"SIGTERM received: saved step {stop}, exiting"]
    with checkpoint.Checkpointer(str(tmp_path / "split" / "checkpoints")) as ckpt:
        assert ckpt.latest_step() == stop
    assert not os.path.exists(tmp_path / "split" / "vectors.txt")
    assert not os.path.exists(tmp_path / "split" / "run.lock")
    resumed = train_word_vectors(cfg, tmp_path / "split", text=text, progress=False)
    np.testing.assert_array_equal(resumed.vectors, whole.vectors)
    assert ((tmp_path / "split" / "vectors.txt").read_bytes()
            == (tmp_path / "whole" / "vectors.txt").read_bytes())
    with pytest.raises(ValueError, match=r"different configuration \(fields \['seed'\]"):
        train_word_vectors(WordVectorConfig(**{**cfg.to_dict(), "seed": 1}), tmp_path / "split",
                           text=text, progress=False)


@pytest.mark.parametrize("field,value,match", [
    ("window", 0, "window=0: expected a positive int"),
    ("negatives", 0, "negatives=0: expected a positive int"),
    ("objective", "fasttext", "objective='fasttext'"),
    ("sample", 1.5, r"sample=1.5"),
])
def test_bad_settings_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        WordVectorConfig(**{field: value})


def test_empty_corpus_and_emptied_vocabulary_are_refused(tmp_path):
    with pytest.raises(ValueError, match="corpus is empty"):
        train_word_vectors(WordVectorConfig(), tmp_path / "a", text="  \n\n", progress=False)
    with pytest.raises(ValueError, match="min_count=5 leaves an empty vocabulary"):
        train_word_vectors(WordVectorConfig(min_count=5), tmp_path / "b", text="one two two\n",
                           progress=False)


# ------------------------------------------------------------------ the run directory's rules (issue 12)

TINY = WordVectorConfig(objective="glove", dimension=4, window=2, min_count=1, epochs=1, batch_size=32,
                        log_every=1000, checkpoint_every=1000)
TEXT = planted_corpus(3, 40)


def _tree(root):
    """Every path under `root` with its bytes (None for folders)."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = None if os.path.isdir(path) else open(path, "rb").read()
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_and_left_unchanged(tmp_path, overwrite):
    (tmp_path / ".git").mkdir()
    (tmp_path / "notes.txt").write_text("mine\n")
    before = _tree(tmp_path)
    with pytest.raises(run_dir.RunDirError, match="is not empty and holds no run"):
        train_word_vectors(TINY, tmp_path, text=TEXT, progress=False, overwrite=overwrite)
    assert _tree(tmp_path) == before


def test_a_run_that_lost_its_config_is_an_error_and_a_held_one_is_refused(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "5").mkdir(parents=True)
    (out / "checkpoints" / "5" / "params").write_text("x")
    before = _tree(out)
    with pytest.raises(run_dir.RunDirError, match="holds checkpoints but no config.json"):
        train_word_vectors(TINY, out, text=TEXT, progress=False)
    assert _tree(out) == before
    (out / "config.json").write_text(json.dumps(TINY.to_dict()))
    with run_dir.RunLock(out):  # another writer (this process, so it counts as alive)
        before = _tree(out)
        for overwrite in (False, True):
            with pytest.raises(run_dir.RunLockedError, match=f"in use by pid {os.getpid()}"):
                train_word_vectors(TINY, out, text=TEXT, progress=False, overwrite=overwrite)
            assert _tree(out) == before


def test_a_full_disk_is_one_error_naming_the_directory(tmp_path, monkeypatch):
    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(run_dir, "write_json_atomic", no_space)  # the config, the first write
    with pytest.raises(run_dir.DiskFullError) as info:
        train_word_vectors(TINY, tmp_path / "run", text=TEXT, progress=False)
    assert str(info.value) == (f"[Errno 28] disk full: no space left on the device holding "
                               f"{tmp_path / 'run'} while training word vectors")
    assert os.listdir(tmp_path / "run") == []  # the lock released


def test_overwrite_replaces_only_the_package_files(tmp_path):
    out = tmp_path / "run"
    train_word_vectors(TINY, out, text=TEXT, progress=False, say=lambda s: None)
    (out / "notes.txt").write_text("mine\n")
    other = WordVectorConfig(**{**TINY.to_dict(), "dimension": 3})
    with pytest.raises(ValueError, match=r"different configuration \(fields \['dimension'\]"):
        train_word_vectors(other, out, text=TEXT, progress=False)
    kv = train_word_vectors(other, out, text=TEXT, progress=False, overwrite=True, say=lambda s: None)
    assert kv.vectors.shape[1] == 3 and (out / "notes.txt").read_text() == "mine\n"
    assert json.loads((out / "config.json").read_text())["dimension"] == 3
    assert sorted(n for n in os.listdir(out) if not n.startswith("events.")) == [
        "checkpoints", "config.json", "encoded_corpus", "loss.png", "metrics.jsonl", "notes.txt", "vectors.txt",
        "vocab.txt"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
