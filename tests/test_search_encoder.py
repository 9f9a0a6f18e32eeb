"""SentenceEncoder: pooling against float64 NumPy on unpadded forward passes, batch-size and
bucket independence, truncation, loading a train.py run and a Pretrained-shaped model."""
import json
import os

import jax
import numpy as np
import pytest

import train
from transformer_jax.checkpoint import Checkpointer
from transformer_jax.config import ModelConfig
from transformer_jax.models import DecoderLM, Encoder, MaskedLM
from transformer_jax.pretrained import Pooling, Pretrained
from transformer_jax.search import SentenceEncoder
from transformer_jax.search import encoder as encoder_module
from transformer_jax.tokenizers import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAX_LEN = 24


class CharTokenizerWithSpecials:
    """One id per character, then [CLS] ... [SEP] around it, as a BERT tokenizer adds them."""

    pad_id, cls_id, sep_id = 0, 1, 2

    def encode_batch(self, texts):
        return [np.array([self.cls_id, *[3 + ord(c) % 40 for c in t], self.sep_id], np.int32) for t in texts]


@pytest.fixture(scope="module")
def pretrained():
    cfg = ModelConfig(vocab_size=43, max_len=MAX_LEN, d_model=32, num_heads=4, num_layers=2, d_ff=64)
    model = Encoder(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    return Pretrained(model, params, CharTokenizerWithSpecials(), cfg, Pooling("mean", True))


@pytest.fixture(scope="module")
def texts():
    """12 texts of 4 lengths (2, 5, 11 and 22 tokens with the specials: buckets 8, 16, 24)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghij klmnop")
    return ["".join(rng.choice(letters, size=n)) for n in rng.permutation([0, 3, 9, 20] * 3)]


@pytest.fixture(scope="module")
def hidden_alone(pretrained, texts):
    """float64 hidden states of each text without padding (texts of one length run together)."""
    ids = pretrained.tokenizer.encode_batch(texts)
    hidden = [None] * len(texts)
    apply = jax.jit(pretrained.model.apply)  # eager op-by-op dispatch would be slower than compiling
    for length in {len(x) for x in ids}:
        rows = [i for i, x in enumerate(ids) if len(x) == length]
        out = apply({"params": pretrained.params}, np.stack([ids[i] for i in rows]))
        for i, h in zip(rows, np.asarray(out, np.float64)):
            hidden[i] = h
    return hidden


@pytest.fixture(scope="module")
def mean_encoder(pretrained):
    """Shared, so its compiled shapes serve several tests."""
    return make_encoder(pretrained)


def reference_pool(hidden, mode, normalize):
    vectors = np.stack([{"mean": h.mean(0), "first": h[0], "max": h.max(0)}[mode] for h in hidden])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if normalize else vectors


def make_encoder(pretrained, **kwargs):
    options = dict(pooling="mean", normalize=False, max_length=MAX_LEN, name="fake")
    options.update(kwargs)
    return SentenceEncoder(pretrained.model, pretrained.params, pretrained.tokenizer, **options)


@pytest.mark.parametrize("mode,normalize", [("mean", False), ("first", True), ("max", False)])
def test_pooling_matches_float64_reference(pretrained, texts, hidden_alone, mode, normalize):
    encoder = make_encoder(pretrained, pooling=mode, normalize=normalize)
    got = encoder.encode(texts, batch_size=len(texts))  # one padded batch: one compilation
    assert got.dtype == np.float32 and got.shape == (len(texts), 32)
    np.testing.assert_allclose(got, reference_pool(hidden_alone, mode, normalize), rtol=0, atol=2e-5)


def test_independent_of_batch_size_and_bucket_and_few_compilations(pretrained, mean_encoder, texts,
                                                                   hidden_alone):
    assert mean_encoder.buckets == (8, 16, MAX_LEN)
    reference = reference_pool(hidden_alone, "mean", False)
    before = mean_encoder.traces
    by_batch = {b: mean_encoder.encode(texts, batch_size=b) for b in (3, 12)}
    assert mean_encoder.traces - before == 3 + 1  # 3 rows x 3 buckets; 12 rows x bucket 24
    one_bucket = make_encoder(pretrained, buckets=()).encode(texts, batch_size=3)  # all padded to 24
    for got in [*by_batch.values(), one_bucket]:
        np.testing.assert_allclose(got, by_batch[3], rtol=0, atol=2e-6)
        np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5)


def test_long_text_is_truncated_with_a_warning(mean_encoder):
    encoder = mean_encoder
    long_text = "abcdefghijklmnopqrstuvwxyz" * 2
    with pytest.warns(UserWarning, match=r"1 of 2 texts are longer than the model's context of 24"):
        got = encoder.encode([long_text, "short"], batch_size=3)
    # [CLS] + the first 22 characters + [SEP]: the closing special survives truncation
    np.testing.assert_allclose(got[0], encoder.encode([long_text[:MAX_LEN - 2]], batch_size=3)[0], rtol=0, atol=1e-6)


def test_bad_inputs(pretrained, mean_encoder):
    encoder = mean_encoder
    with pytest.raises(ValueError, match="texts is empty"):
        encoder.encode([])
    with pytest.raises(TypeError, match="not one str"):
        encoder.encode("a sentence")
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        encoder.encode(["a", 3])
    with pytest.raises(ValueError, match="batch_size=0"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="pooling='sum'"):
        make_encoder(pretrained, pooling="sum")
    model, params = encoder_module.encoder_of(MaskedLM(pretrained.config), {"encoder": "P"}, "dir")
    assert isinstance(model, Encoder) and model.cfg == pretrained.config and params == "P"
    with pytest.raises(ValueError, match="'dir' holds a DecoderLM, not an encoder"):
        encoder_module.encoder_of(DecoderLM(pretrained.config), {}, "dir")


class TruncatingTokenizer(CharTokenizerWithSpecials):
    """Cuts at max_length itself, keeping [SEP], as the Hugging Face tokenizer of a model does."""

    max_length = 16

    def encode(self, text):
        return super().encode_batch([text])[0][1:-1]

    def encode_batch(self, texts):
        return [x if x.size <= self.max_length else np.concatenate([x[:self.max_length - 1], x[-1:]])
                for x in super().encode_batch(texts)]


def test_load_pretrained_directory(pretrained, texts, hidden_alone, tmp_path, monkeypatch):
    """Through `from_pretrained`'s interface: pooling and normalisation from the model's files,
    the tokenizer's max_length, its own truncation reported; without pooling, mean + a warning."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = pretrained._replace(tokenizer=TruncatingTokenizer(), pooling=Pooling("first", True))
    monkeypatch.setattr(encoder_module, "from_pretrained", lambda path: result)
    encoder = SentenceEncoder.load(tmp_path)
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("first", True, 16)
    short = [i for i, t in enumerate(texts) if len(t) <= 14]  # 16 tokens with the specials
    np.testing.assert_allclose(encoder.encode([texts[i] for i in short]),
                               reference_pool([hidden_alone[i] for i in short], "first", True), atol=2e-5)
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than the model's context of 16"):
        encoder.encode(["a" * 14, "b" * 15])  # 16 tokens (fits), 17 (cut by the tokenizer)
    result = result._replace(pooling=None)
    with pytest.warns(UserWarning, match="records no pooling: using mean pooling"):
        encoder = SentenceEncoder.load(tmp_path)
    assert (encoder.pooling, encoder.normalize) == ("mean", False)
    with pytest.raises(FileNotFoundError, match="no model directory"):
        SentenceEncoder.load(tmp_path / "missing")


def tiny_mlm_run(tmp_path_factory) -> str:
    """A 2-step train.py mlm run on the tiny preset, made once per test session (process) and
    shared with test_search_cli.py."""
    out = tmp_path_factory.getbasetemp() / "search_tiny_mlm_run"
    if (out / "checkpoints").is_dir():
        return str(out)
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]
    data = tmp_path_factory.mktemp("data") / "corpus.txt"
    data.write_text(" ".join(rng.choice(words, size=3000)) + "\n")
    assert train.main(["--objective", "mlm", "--preset", "tiny", "--data", str(data), "--out-dir", str(out),
                       "--mesh", "none", "--batch-size", "4", "--seq-len", "16", "--max-steps", "2",
                       "--eval-every", "2", "--eval-batches", "1", "--log-every", "2",
                       "--checkpoint-every", "2", "--sample-tokens", "0"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    return tiny_mlm_run(tmp_path_factory)


def test_run_directory_of_an_mlm_run(mlm_run):
    texts = ["the cat sat", "a dog", "it ran to the dog and the cat sat on a mat again"]
    with pytest.warns(UserWarning) as caught:
        encoder = SentenceEncoder.load(mlm_run)
        got = encoder.encode(texts, batch_size=2)
    messages = [str(w.message) for w in caught]
    assert any("records no pooling" in m for m in messages)
    assert any("1 of 3 texts are longer than the model's context of 16" in m for m in messages)
    # reference: the run's files read here, each text alone (truncated to 16 chars) through the encoder
    with open(os.path.join(mlm_run, "config.json")) as f:
        cfg = ModelConfig.from_dict(json.load(f)["model"])
    tokenizer = load_tokenizer(mlm_run)
    with Checkpointer(os.path.join(mlm_run, "checkpoints")) as ckpt:
        params = ckpt.restore_params()["encoder"]
    apply = jax.jit(Encoder(cfg).apply)
    want = [np.asarray(apply({"params": params}, tokenizer.encode(t)[None, :16]), np.float64)[0].mean(0)
            for t in texts]
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=2e-5)
    assert encoder.stamp.name == "search_tiny_mlm_run" and len(encoder.stamp.weights_sha256) == 64
    changed = SentenceEncoder(encoder.model, jax.tree.map(lambda x: x * 1.0001, encoder.params),
                              encoder.tokenizer, max_length=16, name="mlm")
    assert changed.stamp.weights_sha256 != encoder.stamp.weights_sha256
    with pytest.raises(ValueError, match="no tokens"):
        encoder.encode(["the", ""])
