"""Tokenizers against independent references: sorted-character ids, Python's UTF-8 codec,
round trips on random text, and save/load identity."""
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from transformer_jax import tokenizers as tokenizers_module
from transformer_jax.tokenizers import (SPECIAL_TOKENS, BPETokenizer, ByteTokenizer,
                                        CharTokenizer, build_tokenizer, load_tokenizer)

FAST = settings(max_examples=30, deadline=None, derandomize=True)
# Any Unicode text except lone surrogates (which no UTF codec accepts).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)

CORPUS = (
    "def tokenize(text):\n    return [c for c in text]\n\n"
    "class Reader:\n    def read(self, path):\n        with open(path) as f:\n"
    "            return f.read()\n"
) * 20 + "Unicode too: naïve café, Ωμέγα, 東京.\n"


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS, vocab_size=320)


@FAST
@given(TEXT)
def test_char_ids_are_sorted_characters(text):
    tok = CharTokenizer.train(text)
    alphabet = sorted(set(text))
    np.testing.assert_array_equal(tok.encode(text), [alphabet.index(c) for c in text])
    assert tok.encode(text).dtype == np.int32
    assert tok.vocab_size == len(alphabet) + 4
    assert tok.special_ids == tuple(range(len(alphabet), len(alphabet) + 4))
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.train("hello world")
    with pytest.raises(ValueError, match=r"2 character.*'!'.*'x'"):
        tok.encode("hex world!")


def test_decode_drops_specials_and_rejects_out_of_range():
    tok = CharTokenizer.train("ab")
    ids = [tok.bos_id, 0, tok.mask_id, 1, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "ab"
    assert tok.decode(np.array(ids, dtype=np.int64)) == "ab"
    assert tok.decode([]) == "" and ByteTokenizer().decode([]) == ""
    with pytest.raises(ValueError, match="ids must lie in"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="ids must lie in"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int32))


@FAST
@given(TEXT)
def test_byte_ids_are_utf8_bytes(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 260 and tok.special_ids == (256, 257, 258, 259)


def test_byte_decode_of_a_split_character_does_not_fail():
    ids = ByteTokenizer().encode("é")[:1]  # half of a two-byte character
    assert ByteTokenizer().decode(ids) == "\ufffd"


def test_bpe_vocabulary_and_specials(bpe):
    assert bpe.vocab_size == 320
    # Specials come after the ordinary symbols (256 bytes + merges).
    assert bpe.special_ids == (316, 317, 318, 319)
    ids = bpe.encode(CORPUS)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 316
    # Merges were learnt: fewer tokens than UTF-8 bytes.
    assert len(ids) < 0.5 * len(CORPUS.encode("utf-8"))


@FAST
@given(TEXT)
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


# Words, digits, punctuation, contractions and every kind of whitespace GPT-2's regex treats
# specially, so that cut points land next to all of them.
PIECES = st.lists(st.sampled_from(["the", "cat", "s", "42", "'s", "'ll", ".", ",(", " ", "  ", "\n", "\n\n",
                                   "\t", "\r\n", "\u3000", "\x85", "\xa0", "\x1c", "é", "日本", "x\n    y", "    \n", "  \n", "def"]),
                  min_size=1, max_size=60).map("".join)


@pytest.fixture(scope="module")
def code_bpe():
    """BPE that has merged runs of whitespace and newlines (as BPE on source code does):
    cutting a text next to such a run would change its tokens."""
    return BPETokenizer.train("def f(x):\n    return x\n\n\n    \n  \n" * 200, vocab_size=400)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(PIECES)
@example("    \nx")  # a cut after this newline would change the tokens
@example("x\n    y\n\ndef")
def test_bpe_encoding_in_parallel_pieces_equals_encoding_whole(code_bpe, text):
    whole = code_bpe._hf.encode(text, add_special_tokens=False).ids
    with pytest.MonkeyPatch.context() as patch:  # (the monkeypatch fixture and @given don't mix)
        patch.setattr(tokenizers_module, "PARALLEL_CHUNK_CHARS", 1)  # cut wherever allowed
        assert "".join(code_bpe._pieces(text)) == text
        assert code_bpe.encode(text).tolist() == whole


def test_bpe_encodes_special_token_text_as_ordinary_text(bpe):
    text = "a <pad> b <mask></s>"
    ids = bpe.encode(text)
    assert not np.isin(ids, bpe.special_ids).any()
    assert bpe.decode(ids) == text


def test_bpe_training_is_deterministic(bpe):
    again = BPETokenizer.train(CORPUS, vocab_size=320)
    assert again.to_json() == bpe.to_json()
    assert again.fingerprint() == bpe.fingerprint()


def test_bpe_from_foreign_file_maps_or_adds_specials(bpe, tmp_path):
    # A GPT-2 style file: one "<|endoftext|>" token serves as bos and eos; no pad/mask.
    foreign = json.loads(bpe.to_json())
    foreign["added_tokens"] = [t for t in foreign["added_tokens"]
                               if t["content"] not in SPECIAL_TOKENS]
    foreign["added_tokens"].append({"id": 316, "content": "<|endoftext|>", "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False,
                                    "special": True})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(foreign), encoding="utf-8")
    tok = BPETokenizer.from_file(path)
    assert tok.bos_id == tok.eos_id == 316
    assert {tok.pad_id, tok.mask_id} == {317, 318} and tok.vocab_size == 319
    np.testing.assert_array_equal(tok.encode(CORPUS), bpe.encode(CORPUS))


@pytest.mark.parametrize("spec", ["char", "byte", "bpe"])
def test_save_and_load_give_the_same_tokenizer(spec, tmp_path):
    tok = build_tokenizer(spec, CORPUS, vocab_size=300)
    path = tok.save(tmp_path / "run")
    for source in (tmp_path / "run", path):  # the directory or the file itself
        loaded = load_tokenizer(source)
        assert type(loaded) is type(tok)
        assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
        np.testing.assert_array_equal(loaded.encode(CORPUS), tok.encode(CORPUS))
        assert build_tokenizer(str(source)).fingerprint() == tok.fingerprint()


def test_fingerprint_tracks_the_id_mapping():
    assert CharTokenizer.train("abc").fingerprint() == CharTokenizer.train("cba").fingerprint()
    assert CharTokenizer.train("abc").fingerprint() != CharTokenizer.train("abd").fingerprint()
    assert CharTokenizer.train("abc").fingerprint() != ByteTokenizer().fingerprint()


def test_bad_specs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="'char', 'byte', 'bpe'"):
        build_tokenizer("wordpiece", CORPUS)
    with pytest.raises(ValueError, match="pass text"):
        build_tokenizer("char")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 260"):
        build_tokenizer("bpe", CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer.json or a directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="text must be a str"):
        ByteTokenizer().encode(b"bytes")
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])


@pytest.mark.parametrize("spec", ["char", "byte", "bpe"])
def test_truncated_tokenizer_file_is_one_line_naming_it(spec, tmp_path):
    path = build_tokenizer(spec, CORPUS, vocab_size=300).save(tmp_path)
    text = open(path, encoding="utf-8").read()
    open(path, "w", encoding="utf-8").write(text[:len(text) * 2 // 3])
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path)
    assert str(path) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, expected", [
    ({"transformer_jax": {"kind": "char"}}, "needs \"chars\""),
    ({"transformer_jax": {"kind": "char", "chars": "abc"}}, "needs \"chars\""),
    ({"transformer_jax": {"kind": "char", "chars": ["ab", "c"]}}, "needs \"chars\""),
    ({"transformer_jax": "char"}, "must be an object whose \"kind\""),
    ({"transformer_jax": {"kind": "word"}}, "must be an object whose \"kind\""),
    (["not", "an", "object"], "holds a JSON list, expected an object"),
])
def test_tokenizer_file_of_the_wrong_shape_is_a_clear_error(content, expected, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ValueError, match=f"tokenizer file {str(path)!r}.*{expected}"):
        load_tokenizer(tmp_path)
