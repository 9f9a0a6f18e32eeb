"""transformer_jax.tasks: batches, the unigram baseline and the clm sample's windowing."""
import collections
import math

import jax
import numpy as np
import pytest

from transformer_jax import models, tasks, tokenizers
from transformer_jax.config import get_config
from transformer_jax.generation import GenerateOutput


def test_unigram_entropy_matches_the_formula():
    tokens = np.random.default_rng(0).integers(0, 5, size=200)
    counts = collections.Counter(tokens.tolist())
    want = -sum(c / 200 * math.log(c / 200) for c in counts.values())
    assert tasks.unigram_entropy(tokens, vocab_size=9) == pytest.approx(want, rel=1e-12)
    assert tasks.unigram_entropy(np.full(10, 3), vocab_size=4) == 0.0


def test_clm_batch_is_windows_of_the_tokens_shifted_by_one():
    tokens = np.arange(100, 300, dtype=np.int32)  # a window's values locate it
    batch = tasks.make_clm_batch(tokens, seed=3, step=5, batch_size=4, seq_len=8)
    assert set(batch) == {"inputs", "targets"}
    assert batch["inputs"].shape == batch["targets"].shape == (4, 8)
    for row, target in zip(batch["inputs"], batch["targets"]):
        start = int(row[0]) - 100
        np.testing.assert_array_equal(row, tokens[start:start + 8])
        np.testing.assert_array_equal(target, tokens[start + 1:start + 9])


@pytest.fixture(scope="module")
def char_model():
    tokenizer = tokenizers.build_tokenizer("char", "abcdefgh ")
    model = models.DecoderLM(get_config("tiny", vocab_size=tokenizer.vocab_size, max_len=8))
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    return model, params, tokenizer


def test_clm_sample_windows_share_one_shape_and_stop_at_eos(char_model, monkeypatch):
    model, params, tokenizer = char_model
    calls = []

    def fake_generate(model, params, prompts, **options):
        """Continues with ids 0, 1, 2, ... across calls; the third call ends with EOS."""
        calls.append((np.asarray(prompts).copy(), options))
        start = 5 * (len(calls) - 1)
        tokens = np.arange(start, start + options["max_new_tokens"]) % 9
        n = len(tokens)
        if len(calls) == 3:
            tokens[2], n = tokenizer.eos_id, 3
        return GenerateOutput(tokens[None], np.array([n]), np.zeros(1))

    monkeypatch.setattr(tasks, "generate", fake_generate)
    text = tasks.clm_sample(model, params, tokenizer, "ab", 100, seed=0, strategy="greedy")
    new = [i % 9 for i in range(12)]  # two full calls, then two tokens before the EOS
    assert text == "ab" + tokenizer.decode(new)

    width, ids = 8 // 2, [int(i) for i in tokenizer.encode("ab")]
    histories = [ids, ids + new[:5], ids + new[:10]]  # what precedes each call
    assert len(calls) == 3
    for (prompts, options), history in zip(calls, histories):
        window = history[-width:]
        assert prompts.shape == (1, width)  # one compilation for every window
        np.testing.assert_array_equal(prompts[0, :len(window)], window)
        np.testing.assert_array_equal(options["prompt_lengths"], [len(window)])
        assert options["max_new_tokens"] == 8 - width + 1
        assert options["eos_id"] == tokenizer.eos_id


def test_clm_sample_greedy_matches_step_by_step_argmax(char_model):
    """Reference: each window re-run without a cache, one argmax at a time."""
    model, params, tokenizer = char_model
    params = jax.tree.map(lambda x: 3 * x, params)  # sharper logits: varied greedy tokens
    prompt, n, width = "abc", 11, 4
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    ids = [int(i) for i in tokenizer.encode(prompt)]
    new = []
    while len(new) < n:
        context = (ids + new)[-width:]
        for _ in range(8 - width + 1):
            padded = np.zeros((1, 8), np.int32)  # causal: padding after the context changes nothing
            padded[0, :len(context)] = context
            logits = forward(padded)
            context.append(int(np.argmax(logits[0, len(context) - 1])))
            new.append(context[-1])
            if new[-1] == tokenizer.eos_id:
                break
        if new[-1] == tokenizer.eos_id:
            new.pop()
            break
    assert len(new) >= n and len(set(new)) > 3  # three windows of varied tokens
    want = prompt + tokenizer.decode(new[:n])
    assert tasks.clm_sample(model, params, tokenizer, prompt, n, seed=0, strategy="greedy") == want


def test_check_batch_rejects_ids_outside_the_vocabulary():
    check_batch = tasks.check_batch
    cfg = get_config("tiny")
    good = {"inputs": np.zeros((2, 8), np.int32), "weights": np.ones((2, 8), np.float32)}
    check_batch(good, cfg)
    bad = {"inputs": np.full((2, 8), cfg.vocab_size, np.int32)}
    with pytest.raises(ValueError, match=r"batch\['inputs'\] ids must lie in \[0, 61\)"):
        check_batch(bad, cfg)
    too_long = {"src": np.zeros((1, cfg.max_len + 1), np.int32)}
    with pytest.raises(ValueError, match="src"):
        check_batch(too_long, cfg)
