"""Data: corpora against direct file reads, token caches against tokenizer.encode, batches
against brute force over tiny corpora, BERT masking against its binomial proportions."""
import os
import sysconfig
import warnings

import numpy as np
import pytest

from transformer_jax.data import (STDLIB_MODULES, TokenSplits, check_pairs, encode_labelled,
                                  encode_pairs,
                                  get_batch, get_mlm_batch, load_text, make_classify_batch,
                                  make_seq2seq_batch, make_shuffle_batch, mask_tokens,
                                  prepare_tokens, read_tsv,
                                  reverse_pairs, seq2seq_lengths, shakespeare_text,
                                  shuffle_examples, split_examples, validate_seq_len)
from transformer_jax.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


# ---------------------------------------------------------------- corpora

def test_stdlib_corpus_is_the_listed_modules_in_sorted_order():
    root = sysconfig.get_paths()["stdlib"]
    expected = ""
    for name in sorted(STDLIB_MODULES):
        with open(os.path.join(root, name + ".py"), encoding="utf-8") as f:
            source = f.read()
        expected += source if source.endswith("\n") else source + "\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every listed module exists on this Python
        text = load_text()
    assert text == expected == load_text("stdlib")
    assert 1_000_000 < len(text) < 3_000_000


def test_folder_is_concatenated_sorted_without_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "B.txt").write_bytes(b"beta\r\nline\r\n")
    (tmp_path / "sub" / "c.txt").write_text("gamma\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("hidden", encoding="utf-8")
    (tmp_path / ".git" / "d.txt").write_text("git", encoding="utf-8")
    assert load_text(tmp_path) == "beta\nline\nalpha\ngamma\n"
    assert load_text(str(tmp_path / "a.txt")) == "alpha"


def test_bad_data_paths_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="existing text file or folder"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        load_text(tmp_path / "empty_dir")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="binary.bin.*not UTF-8"):
        load_text(tmp_path / "binary.bin")


@pytest.mark.slow
def test_shakespeare_corpus_matches_the_reference_figures():
    try:
        text = shakespeare_text()
    except RuntimeError as e:  # no package registry reachable
        pytest.skip(str(e))
    assert len(text) == 5_057_280
    assert len(set(text)) == 84
    assert "\r" not in text and text.endswith("\n") and not text.endswith("\n\n")


# ---------------------------------------------------------------- token cache

class CountingCharTokenizer(CharTokenizer):
    calls = 0

    def encode(self, text):
        CountingCharTokenizer.calls += 1
        return super().encode(text)


class HugeVocabTokenizer(Tokenizer):
    """A test double whose ids need 32 bits: character code + 66000."""

    pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3

    @property
    def vocab_size(self):
        return 70_000

    def encode(self, text):
        return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int32) + 66_000

    def _decode_ordinary(self, ids):
        return "".join(chr(i - 66_000) for i in ids)

    def to_json(self):
        return '{"huge": true}'


def test_prepare_tokens_splits_and_caches(tmp_path):
    rng = np.random.default_rng(fresh_seed())
    text = "".join(rng.choice(list("abcdefgh \n"), size=1000))
    tok = CountingCharTokenizer.train(text)
    CountingCharTokenizer.calls = 0
    splits = prepare_tokens(text, tok, tmp_path)
    assert isinstance(splits, TokenSplits) and isinstance(splits.train, np.memmap)
    assert splits.train.dtype == np.uint16
    ids = CharTokenizer.train(text).encode(text)
    np.testing.assert_array_equal(splits.train, ids[:900])
    np.testing.assert_array_equal(splits.val, ids[900:])
    again = prepare_tokens(text, tok, tmp_path, val_fraction=0.25)
    assert CountingCharTokenizer.calls == 1  # the second call read the cache
    np.testing.assert_array_equal(again.train, ids[:750])
    prepare_tokens(text[:-1], tok, tmp_path)  # other text: another cache file
    assert CountingCharTokenizer.calls == 2
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".bin")]) == 2
    whole = prepare_tokens(text, tok, tmp_path, val_fraction=0.0)
    assert len(whole.train) == 1000 and len(whole.val) == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_record"])
def test_damaged_token_cache_is_rebuilt_with_a_warning_never_trained_on(tmp_path, damage):
    rng = np.random.default_rng(fresh_seed())
    text = "".join(rng.choice(list("abcdefgh \n"), size=1000))
    tok = CountingCharTokenizer.train(text)
    prepare_tokens(text, tok, tmp_path)
    (cache,) = [tmp_path / n for n in os.listdir(tmp_path) if n.endswith(".bin")]
    if damage == "truncate":  # what a full disk or a killed copy leaves
        os.truncate(cache, os.path.getsize(cache) // 2)
    elif damage == "flip":
        data = bytearray(cache.read_bytes())
        data[int(rng.integers(len(data)))] ^= 0x01
        cache.write_bytes(bytes(data))
    else:  # a cache from before the record existed: cannot be checked
        os.unlink(str(cache)[:-len(".bin")] + ".json")
    CountingCharTokenizer.calls = 0
    with pytest.warns(UserWarning, match=f"token cache {cache} .*rebuilding it"):
        splits = prepare_tokens(text, tok, tmp_path)
    assert CountingCharTokenizer.calls == 1
    ids = CharTokenizer.train(text).encode(text)
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is trusted again
        prepare_tokens(text, tok, tmp_path)


def test_prepare_tokens_uses_uint32_for_large_vocabularies(tmp_path):
    splits = prepare_tokens("hello world", HugeVocabTokenizer(), tmp_path, val_fraction=0.5)
    assert splits.train.dtype == np.uint32
    np.testing.assert_array_equal(splits.train, [ord(c) + 66_000 for c in "hello"])


def test_prepare_tokens_errors(tmp_path):
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match="unknown to this char tokenizer"):
        prepare_tokens("abcd", tok, tmp_path)
    with pytest.raises(ValueError, match="too short to split"):
        prepare_tokens("a", tok, tmp_path)
    with pytest.raises(ValueError, match="val_fraction must lie in"):
        prepare_tokens("abc", tok, tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="non-empty str"):
        prepare_tokens("", tok, tmp_path)


# ---------------------------------------------------------------- causal LM batches

def test_get_batch_windows_cover_every_start_and_shift_by_one():
    n, seq_len = 21, 4  # starts 0..16: a space small enough to see all of it
    tokens = np.arange(n, dtype=np.uint16)
    seen = set()
    seed = fresh_seed()
    for step in range(200):
        x, y = get_batch(tokens, seed=seed, step=step, batch_size=8, seq_len=seq_len)
        assert x.shape == y.shape == (8, seq_len) and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(seq_len))  # contiguous windows
        np.testing.assert_array_equal(y, x + 1)
        seen |= set(x[:, 0].tolist())
    assert seen == set(range(n - seq_len)), f"seed {seed}"


def test_get_batch_is_deterministic_in_seed_and_step(tmp_path):
    tokens = np.random.default_rng(fresh_seed()).integers(0, 50, size=500).astype(np.uint16)
    batch = dict(batch_size=4, seq_len=8)
    a = get_batch(tokens, seed=1, step=7, **batch)
    np.testing.assert_array_equal(a, get_batch(tokens, seed=1, step=7, **batch))
    assert not np.array_equal(a[0], get_batch(tokens, seed=1, step=8, **batch)[0])
    assert not np.array_equal(a[0], get_batch(tokens, seed=2, step=7, **batch)[0])
    tokens.tofile(tmp_path / "t.bin")  # a memmap gives the same batch as an array
    mapped = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    np.testing.assert_array_equal(a, get_batch(mapped, seed=1, step=7, **batch))


def _seq2seq_pairs():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    return encode_pairs(reverse_pairs(40, seed=0, max_len=9), tok), tok


BATCH_FUNCTIONS = {
    "clm": lambda **kw: get_batch(np.arange(300, dtype=np.uint16), seq_len=8, **kw),
    "mlm": lambda **kw: get_mlm_batch(np.arange(300, dtype=np.uint16) % 250, seq_len=8,
                                      tokenizer=ByteTokenizer(), **kw),
    "seq2seq": lambda **kw: make_seq2seq_batch(
        _seq2seq_pairs()[0], src_len=8, tgt_len=8, pad_id=26, bos_id=27, eos_id=28, **kw),
    "classify": lambda **kw: make_classify_batch(
        [(np.arange(i % 7 + 1), i % 3) for i in range(30)], seq_len=6, pad_id=99, **kw),
}


@pytest.mark.parametrize("kind", sorted(BATCH_FUNCTIONS))
def test_global_batch_is_independent_of_process_count(kind):
    make = BATCH_FUNCTIONS[kind]
    seed = fresh_seed()
    whole = make(seed=seed, step=3, batch_size=8)
    for count in (2, 4):
        parts = [make(seed=seed, step=3, batch_size=8, process_index=i, process_count=count)
                 for i in range(count)]
        for j, array in enumerate(whole):
            assert parts[0][j].shape[0] == 8 // count
            np.testing.assert_array_equal(np.concatenate([p[j] for p in parts]), array)
    middle = make(seed=seed, step=3, batch_size=8, rows=slice(2, 6))  # e.g. a replica group
    for j, array in enumerate(whole):
        np.testing.assert_array_equal(middle[j], array[2:6])
    np.testing.assert_array_equal(whole[0], make(seed=seed, step=3, batch_size=8)[0])


def test_batch_arguments_are_validated():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 1 = 11"):
        get_batch(tokens, seed=0, step=0, batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="val holds 10 tokens"):
        validate_seq_len(tokens, 10, name="val")
    with pytest.raises(ValueError, match="divisible by process_count=4"):
        get_batch(tokens, seed=0, step=0, batch_size=6, seq_len=4, process_count=4)
    with pytest.raises(ValueError, match="process_index must be an int in \\[0, 2\\)"):
        get_batch(tokens, seed=0, step=0, batch_size=4, seq_len=4, process_index=2,
                  process_count=2)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        get_batch(tokens, seed=-1, step=0, batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        get_batch(tokens, seed=0, step=0, batch_size=2, seq_len=0)
    with pytest.raises(ValueError, match="rows must be a non-empty slice within \\[0, 4\\)"):
        get_batch(tokens, seed=0, step=0, batch_size=4, seq_len=4, rows=slice(2, 6))
    with pytest.raises(ValueError, match="tgt_len must be a positive int"):
        make_seq2seq_batch(_seq2seq_pairs()[0], seed=0, step=0, batch_size=2, src_len=4,
                           tgt_len=0, pad_id=26, bos_id=27, eos_id=28)


# ---------------------------------------------------------------- masked LM

def test_mask_tokens_follows_bert_proportions():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    num_ordinary, specials, mask_id = 10, (10, 11, 12, 13), 13
    tokens = rng.integers(0, num_ordinary, size=(400, 500))
    tokens[rng.random(tokens.shape) < 0.1] = 10  # padding must never be chosen
    inputs, labels, weights = mask_tokens(tokens, rng=rng, mask_id=mask_id, vocab_size=14,
                                          special_ids=specials)
    assert inputs.dtype == labels.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(labels, tokens)
    chosen = weights == 1.0
    assert np.isin(weights, (0.0, 1.0)).all()
    eligible = tokens != 10
    assert not chosen[~eligible].any(), f"seed {seed}"
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])

    def assert_binomial(count, trials, p):  # within 5 standard deviations
        assert abs(count - trials * p) < 5 * np.sqrt(trials * p * (1 - p)), (count, trials, p, seed)

    n_chosen = chosen.sum()
    assert_binomial(n_chosen, eligible.sum(), 0.15)
    masked = inputs[chosen] == mask_id
    replaced = (inputs[chosen] != mask_id) & (inputs[chosen] != tokens[chosen])
    assert_binomial(masked.sum(), n_chosen, 0.8)
    # A random replacement equals the original with probability 1/num_ordinary.
    assert_binomial(replaced.sum(), n_chosen, 0.1 * (1 - 1 / num_ordinary))
    replacements = inputs[chosen][replaced]
    counts = np.bincount(replacements, minlength=14)
    assert counts[num_ordinary:].sum() == 0  # never a special id
    for token in range(num_ordinary):  # uniform over the other ordinary ids
        others = tokens[chosen][replaced] != token
        assert_binomial(counts[token], others.sum(), 1 / (num_ordinary - 1))


def test_mask_tokens_is_deterministic_and_validated():
    tokens = np.arange(64).reshape(4, 16) % 30
    a = mask_tokens(tokens, rng=5, mask_id=31, vocab_size=32)
    b = mask_tokens(tokens, rng=np.random.default_rng(5), mask_id=31, vocab_size=32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="mask_prob must lie in"):
        mask_tokens(tokens, rng=0, mask_id=31, vocab_size=32, mask_prob=0.0)
    with pytest.raises(ValueError, match="mask_id must lie in"):
        mask_tokens(tokens, rng=0, mask_id=32, vocab_size=32)


def test_get_mlm_batch_masks_the_clm_windows():
    tokens = np.random.default_rng(fresh_seed()).integers(0, 256, size=400).astype(np.uint16)
    tok = ByteTokenizer()
    inputs, labels, weights = get_mlm_batch(tokens, seed=3, step=1, batch_size=16, seq_len=12,
                                            tokenizer=tok)
    windows, _ = get_batch(tokens, seed=3, step=1, batch_size=16, seq_len=12)
    np.testing.assert_array_equal(labels, windows)
    assert inputs.shape == weights.shape == (16, 12)
    assert 0 < weights.sum() < weights.size
    assert (inputs[weights == 1] == tok.mask_id).any()


# ---------------------------------------------------------------- seq2seq

def test_check_pairs_names_rows_that_do_not_fit_before_training():
    rng = np.random.default_rng(fresh_seed())
    lengths = rng.integers(1, 9, size=(30, 2))  # every source in [1, 8], target in [1, 8] tokens
    pairs = [(np.ones(s, np.int32), np.ones(t, np.int32)) for s, t in lengths]
    check_pairs(pairs, max_src_len=8, max_tgt_len=9, source="ok.tsv")  # eos fits: no error
    bad = dict(enumerate(pairs, start=1))
    rows = sorted(rng.choice(np.arange(1, 31), size=3, replace=False).tolist())
    bad[rows[0]] = (np.ones(9, np.int32), pairs[rows[0] - 1][1])  # source too long
    bad[rows[1]] = (np.zeros(0, np.int32), pairs[rows[1] - 1][1])  # empty source
    bad[rows[2]] = (pairs[rows[2] - 1][0], np.ones(9, np.int32))  # target + eos too long
    expected = {rows[0]: f"row {rows[0]}: source of 9 tokens > 8", rows[1]: f"row {rows[1]}: empty source",
                rows[2]: f"row {rows[2]}: target of 9 tokens \\+ eos > 9"}
    with pytest.raises(ValueError, match="pairs.tsv: 3 problem\\(s\\) in 30 pairs \\("
                       + "; ".join(expected[r] for r in rows)):
        check_pairs([bad[i] for i in range(1, 31)], max_src_len=8, max_tgt_len=9, source="pairs.tsv")


def test_reverse_pairs():
    pairs = reverse_pairs(50, seed=fresh_seed(), min_len=2, max_len=5, alphabet="xyz")
    assert len(pairs) == 50
    for src, tgt in pairs:
        assert tgt == src[::-1] and 2 <= len(src) <= 5 and set(src) <= set("xyz")
    assert reverse_pairs(5, seed=1) == reverse_pairs(5, seed=1)


def test_seq2seq_batch_against_row_by_row_reference():
    pairs, tok = _seq2seq_pairs()
    pad, bos, eos = tok.pad_id, tok.bos_id, tok.eos_id
    src_len, tgt_len = 6, 7  # some sources and targets are cut
    src, tgt_in, tgt_out, src_mask, tgt_mask = make_seq2seq_batch(
        pairs, seed=fresh_seed(), step=0, batch_size=16, src_len=src_len, tgt_len=tgt_len,
        pad_id=pad, bos_id=bos, eos_id=eos)
    for arr in (src, tgt_in, tgt_out):
        assert arr.dtype == np.int32
    assert src_mask.dtype == tgt_mask.dtype == bool
    for row in range(16):
        s = src[row][src_mask[row]].tolist()
        matches = [(ps, pt) for ps, pt in pairs if ps[:src_len].tolist() == s]
        assert matches, "every source row comes from a pair"
        t = matches[0][1].tolist()

        def padded(seq):
            seq = seq[:tgt_len]
            return seq + [pad] * (tgt_len - len(seq))

        assert src[row].tolist() == s + [pad] * (src_len - len(s))
        assert tgt_in[row].tolist() == padded([bos] + t)
        assert tgt_out[row].tolist() == padded(t + [eos])
        assert tgt_mask[row].tolist() == [i < len(t) + 1 for i in range(tgt_len)]


def test_seq2seq_lengths_hold_every_pair_uncut():
    pairs, tok = _seq2seq_pairs()
    src_len, tgt_len = seq2seq_lengths(pairs)
    assert (src_len, tgt_len) == (max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs) + 1)
    _, _, tgt_out, _, tgt_mask = make_seq2seq_batch(
        pairs, seed=0, step=0, batch_size=32, src_len=src_len, tgt_len=tgt_len,
        pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    last = tgt_mask.sum(axis=1) - 1
    assert (tgt_out[np.arange(32), last] == tok.eos_id).all()


# ---------------------------------------------------------------- classification

def test_shuffle_examples_are_windows_or_their_permutations():
    tokens = np.random.default_rng(fresh_seed()).integers(0, 5, size=60)
    examples = shuffle_examples(tokens, 20, seed=0, seq_len=8)
    assert [label for _, label in examples] == [0, 1] * 10
    for ids, label in examples:
        assert 4 <= len(ids) <= 8 and ids.dtype == np.int32
        windows = [tokens[s:s + len(ids)] for s in range(len(tokens) - len(ids) + 1)]
        if label == 0:
            assert any(np.array_equal(ids, w) for w in windows)
        else:
            assert any(np.array_equal(np.sort(ids), np.sort(w)) for w in windows)


def test_shuffle_batches_are_fresh_each_step_and_split_over_processes():
    tokens = np.random.default_rng(fresh_seed()).integers(1, 50, size=500)
    seed = fresh_seed()
    ids, mask, labels = make_shuffle_batch(tokens, seed=seed, step=3, batch_size=8, seq_len=10,
                                           pad_id=0)
    assert ids.shape == mask.shape == (8, 10) and labels.tolist() == [0, 1] * 4
    for row, label in zip(ids, labels):
        real = row[row != 0]
        assert 5 <= len(real) <= 10
        windows = [tokens[s:s + len(real)] for s in range(len(tokens) - len(real) + 1)]
        match = (lambda w: np.array_equal(real, w)) if label == 0 else (
            lambda w: np.array_equal(np.sort(real), np.sort(w)))
        assert any(match(w) for w in windows)
    again = make_shuffle_batch(tokens, seed=seed, step=3, batch_size=8, seq_len=10, pad_id=0)
    assert all(np.array_equal(a, b) for a, b in zip((ids, mask, labels), again))
    other, _, _ = make_shuffle_batch(tokens, seed=seed, step=4, batch_size=8, seq_len=10, pad_id=0)
    assert not np.array_equal(ids, other)  # a new step draws new windows
    halves = [make_shuffle_batch(tokens, seed=seed, step=3, batch_size=8, seq_len=10, pad_id=0,
                                 process_index=i, process_count=2)[0] for i in range(2)]
    assert np.array_equal(np.concatenate(halves), ids)


def test_classify_batch_pads_and_labels():
    examples = [(np.arange(1, n + 1, dtype=np.int32), n % 2) for n in range(1, 12)]
    tokens, padding_mask, labels = make_classify_batch(examples, seed=fresh_seed(), step=0,
                                                       batch_size=8, seq_len=6, pad_id=0)
    assert tokens.shape == padding_mask.shape == (8, 6) and labels.shape == (8,)
    assert tokens.dtype == labels.dtype == np.int32 and padding_mask.dtype == bool
    lengths = padding_mask.sum(axis=1)
    for row in range(8):  # example n is 1..n, cut at 6; its label is n % 2
        n = tokens[row].max()
        assert lengths[row] == min(n, 6)
        assert tokens[row].tolist() == [i + 1 if i < n else 0 for i in range(6)]
        assert n == 6 or labels[row] == n % 2
    with_cls, cls_mask, _ = make_classify_batch(examples, seed=1, step=0, batch_size=8,
                                                seq_len=6, pad_id=0, cls_id=42)
    plain, plain_mask, _ = make_classify_batch(examples, seed=1, step=0, batch_size=8,
                                               seq_len=6, pad_id=0)
    assert (with_cls[:, 0] == 42).all()
    np.testing.assert_array_equal(with_cls[:, 1:], plain[:, :-1])
    np.testing.assert_array_equal(cls_mask[:, 1:], plain_mask[:, :-1])


def test_tsv_rows_labels_and_split(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("pos\tgood film\n\nneg\tbad film\npos\tfine\n", encoding="utf-8")
    rows = read_tsv(path)
    assert rows == [("pos", "good film"), ("neg", "bad film"), ("pos", "fine")]
    tok = CharTokenizer.train("good film bad fine")
    examples, names = encode_labelled(rows, tok)
    assert names == ["neg", "pos"] and [label for _, label in examples] == [1, 0, 1]
    np.testing.assert_array_equal(examples[1][0], tok.encode("bad film"))
    with pytest.raises(ValueError, match="not in label_names"):
        encode_labelled(rows, tok, label_names=["pos"])
    train, val = split_examples(list(range(10)), 0.2)
    assert train == list(range(8)) and val == [8, 9]
    with pytest.raises(ValueError, match="too few"):
        split_examples([1], 0.1)
    (tmp_path / "bad.tsv").write_text("a\tb\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected 2 tab-separated fields, got 1"):
        read_tsv(tmp_path / "bad.tsv")
    (tmp_path / "blank.tsv").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no rows"):
        read_tsv(tmp_path / "blank.tsv")


def test_check_pairs_leaves_targets_alone_without_max_tgt_len():
    long_target = [(np.ones(3, np.int32), np.ones(50, np.int32))]
    check_pairs(long_target, max_src_len=3)  # cut by make_seq2seq_batch, as documented
    with pytest.raises(ValueError, match="row 1: target of 50 tokens"):
        check_pairs(long_target, max_src_len=3, max_tgt_len=16)
