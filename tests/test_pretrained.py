"""transformer_jax.pretrained against the golden outputs of Hugging Face transformers.

The fixtures (tests/fixtures/hf/<model_type>/) are tiny random-initialised models saved
by transformers' `save_pretrained`, with the logits, greedy and beam outputs transformers
computed for fixed inputs (tests/fixtures/make_hf_fixtures.py, not run here: no torch).
Inputs are unpadded or right-padded, where both libraries number positions alike.
"""
from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from transformer_jax import generate
from transformer_jax.pretrained import Pooling, from_pretrained, save_pretrained
from transformer_jax.pretrained.safetensors_io import read_header

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
CAUSAL = ("gpt2", "llama", "mistral", "qwen2")
ALL = (*CAUSAL, "bert", "bert_classifier", "marian")
PAD_MARIAN = 95  # the marian fixture's pad = decoder start id


def golden(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(FIXTURES, name, "golden.npz")))


def logits_of(pre, name: str, g: dict) -> np.ndarray:
    v = {"params": pre.params}
    tokens = jnp.asarray(g["tokens"], jnp.int32)
    if name.startswith("bert"):
        return np.asarray(pre.model.apply(v, tokens, padding_mask=jnp.asarray(g["mask"]),
                                          token_type_ids=jnp.asarray(g["token_type_ids"], jnp.int32)))
    if name == "marian":
        return np.asarray(pre.model.apply(v, tokens, jnp.asarray(g["tgt"], jnp.int32),
                                          src_padding_mask=jnp.asarray(g["mask"])))
    return np.asarray(pre.model.apply(v, tokens))


@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers(name):
    g = golden(name)
    pre = from_pretrained(os.path.join(FIXTURES, name))
    ours = logits_of(pre, name, g)
    real = g["mask"] if name == "bert" else np.ones(ours.shape[:-1], bool)  # padding slots: meaningless
    assert ours.dtype == np.float32 and ours.shape == g["logits"].shape
    assert np.abs(g["logits"]).max() > 3  # the fixture's weights make every detail count
    np.testing.assert_allclose(ours[real], g["logits"][real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", (*CAUSAL, "marian"))
def test_greedy_and_beam_match_transformers(name):
    """Without EOS both libraries rank beams by summed log-probability alike."""
    g = golden(name)
    pre = from_pretrained(os.path.join(FIXTURES, name))
    new = g["greedy"].shape[1]
    options = dict(max_new_tokens=new)
    prompts = g["tokens"]
    if name == "marian":  # decoding starts at the pad id, which is never generated
        options.update(bos_id=PAD_MARIAN, suppress_ids=[PAD_MARIAN])
        prompts = prompts[:1]
    greedy = generate(pre.model, pre.params, prompts, **options)
    np.testing.assert_array_equal(greedy.tokens, g["greedy"])
    beam = generate(pre.model, pre.params, prompts, strategy="beam", num_beams=3, **options)
    np.testing.assert_array_equal(beam.tokens, g["beam"])


def test_config_mapping():
    pre = from_pretrained(os.path.join(FIXTURES, "mistral"))
    cfg = pre.config
    assert (cfg.norm, cfg.activation, cfg.pos_encoding, cfg.sliding_window, cfg.kv_heads) == (
        "rmsnorm", "swiglu", "rotary", 4, 1)
    assert from_pretrained(os.path.join(FIXTURES, "llama")).config.rope_base == 500.0
    qwen = from_pretrained(os.path.join(FIXTURES, "qwen2")).config
    assert qwen.qkv_use_bias and not qwen.use_bias and qwen.tie_embeddings
    bert = from_pretrained(os.path.join(FIXTURES, "bert"), dtype="bfloat16")
    assert bert.config.dtype == "bfloat16" and type(bert.model).__name__ == "MaskedLM"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bert.params))
    assert bert.tokenizer is None and bert.pooling is None
    clf = from_pretrained(os.path.join(FIXTURES, "bert_classifier")).model
    assert (type(clf).__name__, clf.num_classes, clf.pooling, clf.pooler) == ("SequenceClassifier", 3, "first", True)


@pytest.mark.parametrize("name", ALL)
def test_save_pretrained_round_trip_is_bit_identical(name, tmp_path):
    source = os.path.join(FIXTURES, name)
    pre = from_pretrained(source)
    save_pretrained(tmp_path, pre.model, pre.params, pre.tokenizer)
    again = from_pretrained(tmp_path)
    assert again.config == pre.config
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
    # The safetensors library reads our file, and every tensor transformers wrote comes
    # back bit for bit (ours holds no buffers, and tied copies once).
    ours = load_file(os.path.join(tmp_path, "model.safetensors"))
    with open(os.path.join(tmp_path, "model.safetensors"), "rb") as f:  # data 64-byte aligned: loads without copies
        assert (8 + int.from_bytes(f.read(8), "little")) % 64 == 0
    theirs = {}
    for file in sorted(os.listdir(source)):
        if file.endswith(".safetensors"):
            theirs.update(load_file(os.path.join(source, file)))
    assert set(ours) <= set(theirs)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


# ---------------------------------------------------------------- bad inputs


def copy_fixture(name: str, tmp_path) -> str:
    target = os.path.join(tmp_path, name)
    shutil.copytree(os.path.join(FIXTURES, name), target)
    return target


def rewrite(path: str, mutate) -> None:
    """Rewrite a single-file checkpoint with `mutate(dict of arrays)` applied."""
    from safetensors.numpy import save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    mutate(tensors)
    save_file(tensors, file)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        from_pretrained(tmp_path / "nothing")
    path = copy_fixture("gpt2", tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="holds no weights"):
        from_pretrained(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ValueError, match="config.json.*missing"):
        from_pretrained(path)
    sharded = copy_fixture("llama", tmp_path)
    os.remove(os.path.join(sharded, "model-00002-of-00003.safetensors"))
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors.*missing"):
        from_pretrained(sharded)


def test_truncated_file_names_the_tensor(tmp_path):
    path = copy_fixture("gpt2", tmp_path)
    file = os.path.join(path, "model.safetensors")
    last = max(read_header(file).items(), key=lambda kv: kv[1].end)[0]
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 10)
    with pytest.raises(ValueError, match=f"truncated.*{last}"):
        from_pretrained(path)
    with open(file, "r+b") as f:
        f.truncate(5)
    with pytest.raises(ValueError, match="too short"):
        from_pretrained(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update({"transformer.h.0.ln_1.weight": np.ones(5, np.float32)}),
         r"transformer\.h\.0\.ln_1\.weight.*shape \[5\], expected \[32\]"),
        (lambda t: t.update({"transformer.h.0.extra.weight": np.ones(3, np.float32)}),
         r"does not have.*transformer\.h\.0\.extra\.weight"),
        (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), r"lacks.*transformer\.h\.1\.mlp\.c_fc\.bias"),
        (lambda t: t.update({"transformer.wpe.weight": np.ones((32, 32), np.int32)}), "dtype int32"),
    ],
    ids=["wrong-shape", "unexpected-key", "missing-key", "integer-weights"],
)
def test_bad_tensors_are_named(tmp_path, mutate, message):
    path = copy_fixture("gpt2", tmp_path)
    rewrite(path, mutate)
    with pytest.raises(ValueError, match=message):
        from_pretrained(path)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("gpt2", {"model_type": "t5"}, "model_type='t5' is not supported"),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("bert", {"architectures": ["BertForQuestionAnswering"]}, "BertForQuestionAnswering"),
    ],
)
def test_unsupported_options_are_refused(tmp_path, name, change, message):
    path = copy_fixture(name, tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(change)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=message):
        from_pretrained(path)


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    from transformer_jax import DecoderLM, get_config

    model = DecoderLM(get_config("tiny", pos_encoding="rotary"))  # GPT-2 has learned positions
    with pytest.raises(ValueError, match="pos_encoding='rotary' cannot be saved as a gpt2"):
        save_pretrained(tmp_path, model, {})  # refused from the config, before the params
    pre = from_pretrained(os.path.join(FIXTURES, "gpt2"))
    broken = jax.tree.map(lambda x: x, pre.params)
    del broken["final_norm"]
    with pytest.raises(ValueError, match="final_norm"):
        save_pretrained(tmp_path, pre.model, broken)
    assert not os.listdir(tmp_path)  # nothing written


# ---------------------------------------------------------------- GPT-2's fused c_attn


def random_inputs_and_params(model, seed: int):
    """Tokens [2, 7] and parameters drawn from normal(0.3) (large enough that a misplaced
    weight changes the logits) for `model`."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 7)), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    return tokens, jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_gpt2_c_attn_loads_as_one_fused_kernel_without_a_copy(tmp_path, monkeypatch):
    """A GPT-2 loads with fused_qkv: c_attn [d, 3d] is the qkv kernel [d, 3, h, k] as it
    lies in the file, so a checkpoint our writer aligned loads with no weight copied (the
    arena of converted tensors is empty). A model with separate query/key/value kernels
    saves to the same c_attn and gives the same logits back."""
    from transformer_jax import DecoderLM, get_config
    from transformer_jax.pretrained import loader

    cfg = get_config("tiny")  # separate query/key/value kernels, biases
    model = DecoderLM(cfg)
    tokens, params = random_inputs_and_params(model, seed=0)
    save_pretrained(tmp_path, model, params)

    arenas = []
    real = loader.host_empty
    monkeypatch.setattr(loader, "host_empty", lambda shape, dtype: arenas.append(shape) or real(shape, dtype))
    pre = from_pretrained(tmp_path)
    assert pre.config.fused_qkv and arenas == [(0,)]  # one empty arena: nothing copied
    for i in range(cfg.num_layers):
        ours, theirs = pre.params["blocks"][f"layer_{i}"]["self_attn"], params["blocks"][f"layer_{i}"]["self_attn"]
        for s, name in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(ours["qkv"]["kernel"][:, s], theirs[name]["kernel"])
            np.testing.assert_array_equal(ours["qkv"]["bias"][s], theirs[name]["bias"])
    expected = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(pre.model.apply({"params": pre.params}, tokens), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 1.0


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_fused_model_saves_to_a_format_that_keeps_q_k_v_apart(kind, tmp_path):
    """Llama's and BERT's files hold q_proj/k_proj/v_proj (query/key/value): a fused_qkv
    model is saved with its qkv split, and loads back as the same model, unfused."""
    from transformer_jax import DecoderLM, MaskedLM, get_config

    if kind == "llama":
        cfg = get_config("tiny", fused_qkv=True, norm="rmsnorm", pos_encoding="rotary", use_bias=False,
                         activation="swiglu")
        model = DecoderLM(cfg)
    else:
        cfg = get_config("tiny", fused_qkv=True, norm_position="post", embedding_norm=True, type_vocab_size=2)
        model = MaskedLM(cfg)
    tokens, params = random_inputs_and_params(model, seed=2)
    save_pretrained(tmp_path, model, params)
    pre = from_pretrained(tmp_path)
    assert not pre.config.fused_qkv and pre.config.kv_heads == cfg.num_heads
    stack = lambda p: p["encoder"]["blocks"] if kind == "bert" else p["blocks"]  # noqa: E731
    qkv = stack(params)["layer_1"]["self_attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(stack(pre.params)["layer_1"]["self_attn"]["value"]["kernel"], qkv[:, 2])
    expected = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(pre.model.apply({"params": pre.params}, tokens), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 1.0


# ---------------------------------------------------------------- sharded placement


def test_mesh_places_each_parameter_with_its_sharding():
    from transformer_jax.sharding import make_mesh, use_mesh

    path = os.path.join(FIXTURES, "llama")
    plain = from_pretrained(path)
    mesh = make_mesh("fsdp=2,tensor=2", jax.devices()[:4])
    with use_mesh(mesh):
        sharded = from_pretrained(path, mesh=mesh)
    q = sharded.params["blocks"]["layer_0"]["self_attn"]["query"]["kernel"]  # [embed, heads, head_dim]
    assert q.sharding.spec[:2] == ("fsdp", "tensor")
    assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (16, 2, 8)
    jax.tree.map(np.testing.assert_array_equal, sharded.params, plain.params)

    path = os.path.join(FIXTURES, "gpt2")  # the fused kernel: heads split, q/k/v not
    with use_mesh(mesh):
        sharded = from_pretrained(path, mesh=mesh)
    qkv = sharded.params["blocks"]["layer_0"]["self_attn"]["qkv"]["kernel"]  # [embed, 3, heads, head_dim]
    assert qkv.sharding.spec[:3] == ("fsdp", None, "tensor")
    jax.tree.map(np.testing.assert_array_equal, sharded.params, from_pretrained(path).params)


def test_pooling_modes():
    hidden = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    out = Pooling("mean", normalize=True)(hidden, mask)
    expected = np.stack([hidden[i][mask[i]].mean(0) for i in range(2)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_suppress_ids_are_validated_before_compiling():
    pre = from_pretrained(os.path.join(FIXTURES, "gpt2"))
    for bad in ([96], [-1], ["a"], list(range(96))):
        with pytest.raises(ValueError, match="suppress_ids"):
            generate(pre.model, pre.params, [[1, 2]], max_new_tokens=2, suppress_ids=bad)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    """A bf16 checkpoint (written by our writer; transformers' own reader is the reference
    for the format) loads as the float32 values of its bf16 numbers."""
    import ml_dtypes

    from transformer_jax.pretrained.safetensors_io import write_file

    path = copy_fixture("qwen2", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    halved = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    write_file(file, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in halved.items()])
    with open(file, "rb") as f:  # the header names the dtype as the format does
        assert b'"dtype":"BF16"' in f.read(4096)
    pre = from_pretrained(path)
    reference = from_pretrained(os.path.join(FIXTURES, "qwen2"))
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                           reference.params)
    jax.tree.map(np.testing.assert_array_equal, pre.params, rounded)



def test_writer_keeps_every_whole_multiple_of_64_bytes_aligned(tmp_path):
    """The format allows no gaps between tensors: an odd-sized one (a 3-float bias) must
    not shift the 64-byte multiples after it, which then load without a copy. The
    safetensors library is the reference reader."""
    from transformer_jax.pretrained.safetensors_io import write_file

    rng = np.random.default_rng(0)
    tensors = {"a_bias": rng.standard_normal(3, np.float32), "b_kernel": rng.standard_normal((4, 16), np.float32),
               "c_odd": rng.standard_normal(5, np.float32), "d_kernel": rng.standard_normal((2, 32), np.float32)}
    file = os.path.join(tmp_path, "model.safetensors")
    write_file(file, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
    for name, info in read_header(file).items():
        assert info.end - info.begin == tensors[name].nbytes
        if tensors[name].nbytes % 64 == 0:
            assert info.begin % 64 == 0, (name, info.begin)
    again = load_file(file)
    for name, value in tensors.items():
        np.testing.assert_array_equal(again[name], value)


# ---------------------------------------------------------------- sharded saves


def test_max_shard_size_is_parsed_like_transformers():
    from transformer_jax.pretrained.safetensors_io import parse_size

    assert [parse_size(s) for s in (100, "2GB", "500MB", "5KB", "1GiB", "1.5MB")] == [
        100, 2 * 10**9, 500 * 10**6, 5000, 2**30, 1_500_000]
    for bad in (0, -1, True, "2XB", "GB", "0MB", None):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_sharded_save_has_transformers_layout_and_round_trips(tmp_path):
    """llama's fixture was sharded by transformers: our shards of it follow the same index
    format, every tensor lies where the index says, and loading gives the same bits."""
    source = os.path.join(FIXTURES, "llama")
    pre = from_pretrained(source)
    with open(os.path.join(source, "model.safetensors.index.json")) as f:
        theirs = json.load(f)
    out = str(tmp_path / "out")
    save_pretrained(out, pre.model, pre.params, max_shard_size=20_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index) == set(theirs) and set(index["metadata"]) == set(theirs["metadata"])
    assert index["metadata"] == theirs["metadata"]  # same tensors, float32
    assert set(index["weight_map"]) == set(theirs["weight_map"])
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "model.safetensors" not in os.listdir(out)
    total = 0
    for file in files:
        tensors = load_file(os.path.join(out, file))
        assert {k for k, v in index["weight_map"].items() if v == file} == set(tensors)
        size = sum(v.nbytes for v in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
        total += size
    assert total == index["metadata"]["total_size"]
    again = from_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
    # Saving unsharded over it leaves one consistent checkpoint: no stale index or shard.
    save_pretrained(out, pre.model, pre.params)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    save_pretrained(out, pre.model, pre.params, max_shard_size="20KB")
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == [*files, "model.safetensors.index.json"]
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(out, pre.model, pre.params, max_shard_size="big")


def test_a_failed_sharded_save_leaves_the_previous_one(tmp_path):
    from transformer_jax.pretrained.safetensors_io import write_checkpoint

    pre = from_pretrained(os.path.join(FIXTURES, "gpt2"))
    out = str(tmp_path)
    save_pretrained(out, pre.model, pre.params, max_shard_size=30_000)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    calls = []

    def produce():
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return np.zeros((1000,), np.float32)

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(out, [(f"t{i}", (1000,), np.float32, produce) for i in range(6)], 8000)
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before


def test_a_save_that_fails_or_crashes_never_pairs_new_weights_with_the_old_config(tmp_path, monkeypatch):
    """A failure while writing (here: config.json's write raises) leaves the previous
    export byte for byte, and it loads; a crash amid the renames (here: config.json's
    rename raises, after the new weights are in place) leaves no config.json, so loading
    refuses with an error rather than pairing the new weights with the old config."""
    from transformer_jax.pretrained import loader

    pre = from_pretrained(os.path.join(FIXTURES, "gpt2"))
    out = str(tmp_path / "out")
    save_pretrained(out, pre.model, pre.params)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    doubled = jax.tree.map(lambda x: x * 2, pre.params)
    real_write, real_replace = loader.write_tmp_text, os.replace

    def failing_write(file, text):
        if os.path.basename(file) == "config.json":
            raise OSError("disk full")
        return real_write(file, text)

    monkeypatch.setattr(loader, "write_tmp_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(out, pre.model, doubled)
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before  # no temporaries left
    jax.tree.map(np.testing.assert_array_equal, from_pretrained(out).params, pre.params)
    monkeypatch.setattr(loader, "write_tmp_text", real_write)

    def crashing_replace(src, dst):
        if os.path.basename(dst) == "config.json":
            raise KeyboardInterrupt  # the process dies between the weights' rename and the config's
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(out, pre.model, doubled)
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_file(os.path.join(out, "model.safetensors"))["transformer.wpe.weight"].tolist() == \
        (2 * np.asarray(pre.params["embedder"]["position"]["embedding"])).tolist()  # the new weights are in
    with pytest.raises(ValueError, match="config.json.*missing"):
        from_pretrained(out)
    save_pretrained(out, pre.model, doubled)  # saving again completes the directory
    jax.tree.map(np.testing.assert_array_equal, from_pretrained(out).params, doubled)
