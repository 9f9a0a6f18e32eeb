"""transformer_jax.generation.windowed: generation past the context in sliding windows."""
import jax
import numpy as np
import pytest

from transformer_jax import models, tokenizers
from transformer_jax.config import get_config
from transformer_jax.generation import GenerateOutput, generate_text, generate_windowed, windowed


@pytest.fixture(scope="module")
def char_model():
    tokenizer = tokenizers.build_tokenizer("char", "abcdefgh ")
    model = models.DecoderLM(get_config("tiny", vocab_size=tokenizer.vocab_size, max_len=8))
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    return model, params, tokenizer


def test_windowed_windows_share_one_shape_and_stop_at_eos(char_model, monkeypatch):
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

    monkeypatch.setattr(windowed, "generate", fake_generate)
    text = generate_text(model, params, tokenizer, "ab", 100, seed=0, strategy="greedy")
    new = [i % 9 for i in range(12)]  # two full calls, then two tokens before the EOS
    assert text == tokenizer.decode(new)

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


def test_windowed_greedy_matches_step_by_step_argmax(char_model):
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
    want = tokenizer.decode(new[:n])
    assert generate_text(model, params, tokenizer, prompt, n, seed=0, strategy="greedy") == want
    ids = [int(i) for i in tokenizer.encode(prompt)]
    assert generate_windowed(model, params, ids, n, strategy="greedy", eos_id=tokenizer.eos_id) == new[:n]


def test_windowed_rejects_an_empty_prompt_and_bad_lengths(char_model):
    model, params, tokenizer = char_model
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_windowed(model, params, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_windowed(model, params, [1], 0)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_text(model, params, tokenizer, "", 3)
