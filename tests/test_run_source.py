"""`--init-from` and `train.py sample --model` with a Hugging Face directory (run/source.py).

The fixtures (tests/fixtures/hf/) are tiny random-initialised transformers models with
their golden outputs; they carry no tokenizer, so each test copies one and adds a
character-level tokenizer.json whose ids are the fixture's (id i = chr(32 + i)).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from transformer_jax.pretrained import from_pretrained
from transformer_jax.run import load_run
from transformer_jax.run.source import HF, RUN, has_pooler, source_kind, stack_layers
from transformer_jax.train_config import TrainConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The resumed run jits the same programs again: a persistent cache reads them back."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)):
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def with_tokenizer(name: str, dest) -> str:
    """A copy of fixture `name` with a tokenizer.json: id i < vocab-1 is chr(32 + i), the
    last id is the end-of-text token (also config.json's bos/eos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    path = os.path.join(dest, name)
    shutil.copytree(os.path.join(FIXTURES, name), path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    n = hf["vocab_size"]
    specials = ["<|endoftext|>"] if hf["model_type"] == "gpt2" else ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {chr(32 + i): i for i in range(n - len(specials))}
    vocab.update({s: n - len(specials) + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(path, "tokenizer.json"))
    if hf["model_type"] == "gpt2":
        hf.update(bos_token_id=n - 1, eos_token_id=n - 1)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f)
    return path


def text_of(ids) -> str:
    return "".join(chr(32 + int(i)) for i in ids)


def test_clm_fine_tunes_from_gpt2_resumes_and_samples(tmp_path):
    model_dir = with_tokenizer("gpt2", tmp_path)
    corpus = tmp_path / "a.txt"
    corpus.write_text("a" * 4000)  # every window is "aaa...": the loss has a closed form below
    out = str(tmp_path / "run")
    cfg = TrainConfig(objective="clm", init_from=model_dir, data=str(corpus), out_dir=out, max_steps=2,
                      batch_size=2, seq_len=8, mesh="none", log_every=1, eval_every=2, eval_batches=1, sample_tokens=0,
                      warmup_steps=0, lr=1e-3)
    from transformer_jax.run import train as train_run

    train_run(cfg, say=lambda *a: None)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    # Reference: the pretrained model's cross-entropy on "a" * 8 -> next "a" (float64 NumPy).
    pre = from_pretrained(model_dir)
    a = ord("a") - 32
    logits = np.asarray(pre.model.apply({"params": pre.params}, jnp.full((1, 8), a, jnp.int32)), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    assert first["step"] == 1
    np.testing.assert_allclose(first["train_loss"], -logp[:, a].mean(), rtol=1e-5)

    train_run(TrainConfig(**{**cfg.__dict__, "max_steps": 3}), say=lambda *a: None)  # resumes
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    run = load_run(out)
    assert type(run.tokenizer) is type(pre.tokenizer)
    sentence = "hello, gpt"
    np.testing.assert_array_equal(run.tokenizer.encode(sentence), pre.tokenizer.encode(sentence))
    assert (run.tokenizer.eos_id, run.tokenizer.pad_id) == (pre.tokenizer.eos_id, pre.tokenizer.pad_id)


def test_sample_model_gives_the_fixture_greedy_tokens(tmp_path):
    model_dir = with_tokenizer("gpt2", tmp_path)
    g = np.load(os.path.join(FIXTURES, "gpt2", "golden.npz"))
    for prompt, greedy in zip(g["tokens"], g["greedy"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            train.main(["sample", "--model", model_dir, "--prompt", text_of(prompt), "--strategy", "greedy",
                        "--max-new-tokens", str(len(greedy))])
        assert buf.getvalue() == text_of(prompt) + text_of(greedy) + "\n"


def test_sample_model_translates_with_the_marian_fixture(tmp_path):
    """The prompt is the source; decoding starts at config.json's decoder_start_token_id
    (starting at another id, e.g. the eos id, gives other tokens): the fixture's greedy tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    model_dir = str(tmp_path / "marian")
    shutil.copytree(os.path.join(FIXTURES, "marian"), model_dir)
    vocab = {"</s>": 0, **{chr(32 + i): i for i in range(1, 95)}, "<pad>": 95}  # config: eos 0, pad 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    g = np.load(os.path.join(FIXTURES, "marian", "golden.npz"))
    source, greedy = g["tokens"][0], g["greedy"][0]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train.main(["sample", "--model", model_dir, "--prompt", text_of(source), "--strategy", "greedy",
                    "--max-new-tokens", str(len(greedy))])
    assert buf.getvalue() == text_of(greedy) + "\n"


def test_marian_generation_options_follow_its_config():
    from transformer_jax.pretrained.marian import generation_options

    with open(os.path.join(FIXTURES, "marian", "config.json")) as f:
        hf = json.load(f)
    assert generation_options(hf) == {"bos_id": 95, "pad_id": 95, "eos_id": 0, "suppress_ids": (95,)}
    opus = {**hf, "decoder_start_token_id": None, "bad_words_ids": [[95], [7], [3, 4]], "eos_token_id": [2]}
    assert generation_options(opus) == {"bos_id": 95, "pad_id": 95, "eos_id": 2, "suppress_ids": (7, 95)}


def test_classify_from_bert_keeps_the_encoder_and_pooler(tmp_path):
    model_dir = with_tokenizer("bert_classifier", tmp_path)
    rows = [f"{i % 2}\t{'good fun' if i % 2 else 'bad dull'} {i}" for i in range(40)]
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "cls")
    from transformer_jax.run import train as train_run

    said = []
    result = train_run(TrainConfig(objective="classify", init_from=model_dir, data=str(tsv), out_dir=out,
                                   max_steps=2, batch_size=4, seq_len=16, mesh="none", eval_every=2,
                                   eval_batches=1, log_every=1, sample_tokens=0, lr=1e-12, warmup_steps=0),
                       say=said.append)
    assert result.step == 2 and np.isfinite(result.val_loss)
    # The fixture classifies 3 labels, this data 2: only the read-out starts fresh.
    assert [s for s in said if s.startswith("--init-from")][0].endswith(
        "initialised fresh (classifier/bias, classifier/kernel)")
    run = load_run(out)
    assert run.model.pooler and run.task["pooler"]
    pre = from_pretrained(model_dir)  # with lr 1e-12 the weights stay the pretrained ones
    for got, want in ((run.params["pooler"], pre.params["pooler"]),
                      (run.params["encoder"]["embedder"], pre.params["encoder"]["embedder"])):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_source_kind_and_errors(tmp_path):
    bert = with_tokenizer("bert", tmp_path)
    assert source_kind(bert) == HF
    with pytest.raises(ValueError, match="clm cannot start from .* masked_lm"):
        train.main(["--objective", "clm", "--init-from", bert, "--out-dir", str(tmp_path / "x"),
                    "--max-steps", "1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no run and no Hugging Face model: it has no config"):
        source_kind(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"hidden": 3}')
    with pytest.raises(ValueError, match="holds no run and no Hugging Face model: its config.json has neither"):
        source_kind(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="holds no run .* not a directory"):
        source_kind(str(tmp_path / "missing"))
    os.remove(os.path.join(bert, "model.safetensors"))
    with pytest.raises(ValueError, match="without weights"):
        source_kind(bert)
    no_tok = str(tmp_path / "gpt2-bare")
    shutil.copytree(os.path.join(FIXTURES, "gpt2"), no_tok)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        train.main(["--init-from", no_tok, "--out-dir", str(tmp_path / "y"), "--max-steps", "1"])
    with pytest.raises(ValueError, match="sample needs a causal LM or a translation model"):
        train.main(["sample", "--model", os.path.join(FIXTURES, "bert")])


def test_stack_layers_matches_the_scan_layout():
    rng = np.random.default_rng(0)
    tree = {"embed": rng.normal(size=3), "blocks": {f"layer_{i}": {"w": rng.normal(size=(2, 2))} for i in range(3)}}
    out = stack_layers(tree)
    assert set(out["blocks"]) == {"layers"} and out["blocks"]["layers"]["w"].shape == (3, 2, 2)
    for i in range(3):
        np.testing.assert_array_equal(out["blocks"]["layers"]["w"][i], tree["blocks"][f"layer_{i}"]["w"])
    assert RUN != HF


def test_pooler_where_the_directory_has_one(tmp_path):
    assert has_pooler(os.path.join(FIXTURES, "bert_classifier"))
    assert not has_pooler(os.path.join(FIXTURES, "bert"))


def test_a_bert_model_directory_brings_its_pooler(tmp_path):
    """A BertModel (the layout of sentence-transformers' MiniLM) keeps pooler.dense, which
    from_pretrained's Encoder skips: hf_params adds it as the classifier's `pooler`."""
    from safetensors.numpy import load_file, save_file

    from transformer_jax.run.source import hf_params

    src = os.path.join(FIXTURES, "bert_classifier")
    tensors = {k.removeprefix("bert."): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()
               if not k.startswith("classifier.")}
    (tmp_path / "bert_model").mkdir()
    save_file(tensors, str(tmp_path / "bert_model" / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        hf = {**json.load(f), "architectures": ["BertModel"]}
    (tmp_path / "bert_model" / "config.json").write_text(json.dumps(hf))
    params = hf_params(str(tmp_path / "bert_model"))
    want = from_pretrained(src).params
    assert has_pooler(str(tmp_path / "bert_model"))
    np.testing.assert_array_equal(params["pooler"]["kernel"], np.asarray(want["pooler"]["kernel"]))
    np.testing.assert_array_equal(params["pooler"]["bias"], np.asarray(want["pooler"]["bias"]))
    for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(want["encoder"])):
        np.testing.assert_array_equal(a, np.asarray(b))
