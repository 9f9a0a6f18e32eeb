"""Tests for transformer_jax.generation.

Decoding algorithms are checked on toy trigram "models" (a random logit table indexed
by the last two tokens) against float64 NumPy references: exact enumeration for beam
search, exact distributions for sampling. Model-level tests check `generate` on
DecoderLM and EncoderDecoder against uncached forward passes recomputed from scratch.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from transformer_jax.generation import beam, loop, processors

VOCAB = 5
EOS = 4
PAD = 0


# ---------------------------------------------------------------- toy trigram model
def trigram_table(seed, vocab=VOCAB, scale=2.0):
    """Random next-token logits [vocab, vocab, vocab] float32 indexed by (prev, last)."""
    return (scale * np.random.default_rng(seed).standard_normal((vocab,) * 3)).astype(np.float32)


def trigram_step(table, cache, tokens):
    """Step function of the toy model: the cache is the previous token [batch]."""
    last = tokens[:, 0]
    return table[cache, last], last


def trigram_start(table, contexts):
    """Cache and first logits after two-token contexts [batch, 2]."""
    contexts = jnp.asarray(contexts, jnp.int32)
    return contexts[:, 1], jnp.asarray(table)[contexts[:, 0], contexts[:, 1]]


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def softmax64(x):
    return np.exp(log_softmax64(x))


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_id", "strategy", "top_k"))
def run_decode(table, contexts, rng, temperature, top_p, *, max_new_tokens, eos_id, strategy,
               top_k=None):
    cache, logits = trigram_start(table, contexts)
    if strategy == "greedy":
        select = loop.greedy_select
    else:
        select = loop.sampling_select(rng, temperature=temperature, top_k=top_k,
                                      top_p=None if strategy == "sample" else top_p)
    step = functools.partial(trigram_step, jnp.asarray(table))
    return loop.decode(step, cache, logits, select, max_new_tokens=max_new_tokens,
                       eos_id=eos_id, pad_id=PAD)


@functools.partial(jax.jit, static_argnames=("num_beams", "max_new_tokens", "eos_id"))
def run_beam(table, contexts, length_penalty, *, num_beams, max_new_tokens, eos_id=EOS):
    contexts = jnp.repeat(jnp.asarray(contexts), num_beams, axis=0)
    cache, logits = trigram_start(table, contexts)
    step = functools.partial(trigram_step, jnp.asarray(table))
    return beam.beam_search(step, cache, logits, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=PAD,
                            length_penalty=length_penalty)


# ---------------------------------------------------------------------- processors
def reference_kept(logits, temperature=1.0, top_k=None, top_p=None):
    """Float64 NumPy: the renormalised distribution after temperature/top-k/top-p."""
    probs = softmax64(np.asarray(logits, np.float64) / temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.ones_like(probs, bool)
    if top_k is not None:
        keep[order[top_k:]] = False
    if top_p is not None:
        kept_probs = np.where(keep, probs, 0.0)
        kept_probs /= kept_probs.sum()
        mass = 0.0
        for token in order:  # most likely first, until the mass reaches top_p
            if mass >= top_p:
                keep[token] = False
            mass += kept_probs[token]
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.5, None, None), (2.0, 3, None), (1.0, None, 0.6),
    (0.8, 7, 0.9), (1.0, 1, None), (1.3, None, 1.0), (1.0, 4, 0.05),
])
def test_process_logits_matches_numpy(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 11)).astype(np.float32) * 2
    got = jax.nn.softmax(processors.process_logits(
        jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    want = np.stack([reference_kept(row, temperature, top_k, top_p) for row in logits])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    assert ((np.asarray(got) == 0) == (want == 0)).all()


# ------------------------------------------------------------------ greedy decoding
def reference_greedy(table, context, max_new_tokens, eos_id):
    """Python loop: argmax, append, stop after EOS. Returns (tokens, sum of log-probs)."""
    prev, last = context
    tokens, score = [], 0.0
    for _ in range(max_new_tokens):
        logits = table[prev, last]
        token = int(np.argmax(logits))
        score += log_softmax64(logits)[token]
        tokens.append(token)
        if token == eos_id:
            break
        prev, last = last, token
    return tokens, score


def padded(tokens, width):
    return tokens + [PAD] * (width - len(tokens))


def test_greedy_matches_python_loop_and_stops_at_eos():
    table = trigram_table(1)
    contexts = np.array(list(itertools.product(range(VOCAB), repeat=2)), np.int32)
    out = run_decode(table, contexts, None, 1.0, None, max_new_tokens=6, eos_id=EOS,
                     strategy="greedy")
    assert out.tokens.shape == (len(contexts), 6) and out.tokens.dtype == jnp.int32
    finished_early = 0
    for row, context in enumerate(contexts):
        want, score = reference_greedy(table, context, 6, EOS)
        finished_early += len(want) < 6
        assert out.tokens[row].tolist() == padded(want, 6)
        assert int(out.lengths[row]) == len(want)
        np.testing.assert_allclose(float(out.scores[row]), score, rtol=1e-5)
    assert finished_early > 0  # the table exercises EOS handling


def test_top_k_one_sampling_equals_greedy():
    table = trigram_table(2)
    contexts = np.array(list(itertools.product(range(VOCAB), repeat=2)), np.int32)
    greedy = run_decode(table, contexts, None, 1.0, None, max_new_tokens=6, eos_id=EOS,
                        strategy="greedy")
    sampled = run_decode(table, contexts, jax.random.key(3), 1.7, None, max_new_tokens=6,
                         eos_id=EOS, strategy="sample", top_k=1)
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
    np.testing.assert_array_equal(sampled.lengths, greedy.lengths)


# ---------------------------------------------------------------------- sampling
def assert_frequencies_match(samples, probs, alpha=1e-4):
    """Chi-square goodness of fit of integer samples against exact probabilities."""
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, "sampled a token that should be filtered out"
    support = probs > 0
    expected = probs[support] * len(samples)
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    assert statistic < stats.chi2.ppf(1 - alpha, df=max(support.sum() - 1, 1)), statistic


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.6, None, None), (1.5, 3, None), (1.0, None, 0.7), (0.9, 4, 0.8),
])
def test_sampled_pairs_follow_the_renormalised_distribution(temperature, top_k, top_p):
    """Two sampled tokens per row: the joint frequencies match the exact distribution."""
    table = trigram_table(4, scale=1.0)
    context = (1, 2)
    contexts = np.tile(np.array([context], np.int32), (20000, 1))
    strategy = "sample" if top_p is None else "sample_top_p"
    out = run_decode(table, contexts, jax.random.key(5), temperature, top_p,
                     max_new_tokens=2, eos_id=None, strategy=strategy, top_k=top_k)
    first = reference_kept(table[context], temperature, top_k, top_p)
    joint = np.stack([first[a] * reference_kept(table[context[1], a], temperature, top_k, top_p)
                      for a in range(VOCAB)])
    tokens = np.asarray(out.tokens)
    assert_frequencies_match(tokens[:, 0] * VOCAB + tokens[:, 1], joint.reshape(-1))


def test_sampling_is_reproducible_given_the_key():
    table = trigram_table(6, scale=0.5)
    contexts = np.tile(np.array([[0, 1]], np.int32), (64, 1))
    run = functools.partial(run_decode, table, contexts, temperature=1.0, top_p=None,
                            max_new_tokens=6, eos_id=EOS, strategy="sample")
    a, b, c = run(jax.random.key(7)), run(jax.random.key(7)), run(jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


# -------------------------------------------------------------------- beam search
def enumerate_hypotheses(table, context, max_new_tokens, length_penalty):
    """Every possible output (ends with EOS, or is max_new_tokens long), scored in float64."""
    scored = []
    for length in range(1, max_new_tokens + 1):
        for tokens in itertools.product(range(VOCAB), repeat=length):
            if EOS in tokens[:-1] or (length < max_new_tokens and tokens[-1] != EOS):
                continue
            history, log_prob = list(context), 0.0
            for token in tokens:
                log_prob += log_softmax64(table[history[-2], history[-1]])[token]
                history.append(token)
            scored.append((log_prob / length ** length_penalty, list(tokens)))
    return sorted(scored, key=lambda item: -item[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
def test_beam_search_finds_the_best_sequences_by_enumeration(length_penalty):
    """With as many beams as non-EOS prefixes, beam search is exact: its beams are the
    best hypotheses of the whole space."""
    max_new_tokens, num_beams = 3, (VOCAB - 1) ** 2
    table = trigram_table(8, scale=1.5)
    contexts = np.array([[0, 1], [3, 2]], np.int32)
    out = run_beam(table, contexts, length_penalty, num_beams=num_beams,
                   max_new_tokens=max_new_tokens)
    assert out.tokens.shape == (2, num_beams, max_new_tokens)
    for row, context in enumerate(contexts):
        want = enumerate_hypotheses(table, context, max_new_tokens, length_penalty)[:num_beams]
        np.testing.assert_allclose(out.scores[row], [s for s, _ in want], rtol=1e-5)
        assert out.tokens[row, 0].tolist() == padded(want[0][1], max_new_tokens)
        assert out.lengths[row].tolist() == [len(t) for _, t in want]


def reference_beam_search(table, context, num_beams, max_new_tokens, length_penalty):
    """Float64 beam search without early stopping: at each length the alive beams are
    the best `num_beams` EOS-free extensions; every EOS extension (and, at the last
    step, every alive beam) competes for the finished set."""
    alive = [((), 0.0)]
    finished = []
    for length in range(1, max_new_tokens + 1):
        extensions = []
        for tokens, log_prob in alive:
            history = list(context) + list(tokens)
            log_probs = log_softmax64(table[history[-2], history[-1]])
            for token in range(VOCAB):
                extensions.append((tokens + (token,), log_prob + log_probs[token]))
        penalty = length ** length_penalty
        finished += [(s / penalty, t) for t, s in extensions if t[-1] == EOS]
        alive = sorted([e for e in extensions if e[0][-1] != EOS], key=lambda e: -e[1])
        alive = alive[:num_beams]
        if length == max_new_tokens:
            finished += [(s / penalty, t) for t, s in alive]
    return sorted(finished, key=lambda item: -item[0])[:num_beams]


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_beam_search_with_early_stop_matches_the_exhaustive_reference(length_penalty):
    max_new_tokens, num_beams = 7, 3
    table = trigram_table(9, scale=2.5)
    contexts = np.array(list(itertools.product(range(VOCAB), repeat=2)), np.int32)
    out = run_beam(table, contexts, length_penalty, num_beams=num_beams,
                   max_new_tokens=max_new_tokens)
    for row, context in enumerate(contexts):
        want = reference_beam_search(table, context, num_beams, max_new_tokens, length_penalty)
        np.testing.assert_allclose(out.scores[row], [s for s, _ in want], rtol=1e-5)
        for j, (_, tokens) in enumerate(want):
            assert out.tokens[row, j].tolist() == padded(list(tokens), max_new_tokens)
            assert int(out.lengths[row, j]) == len(tokens)


def test_one_beam_never_scores_below_greedy():
    """One alive beam follows the greedy path, and the finished set also keeps early EOS
    hypotheses, so (without length penalty) it returns greedy's output or a likelier one."""
    table = trigram_table(10)
    contexts = np.array(list(itertools.product(range(VOCAB), repeat=2)), np.int32)
    greedy = run_decode(table, contexts, None, 1.0, None, max_new_tokens=6, eos_id=EOS,
                        strategy="greedy")
    beams = run_beam(table, contexts, 0.0, num_beams=1, max_new_tokens=6)
    same = np.all(np.asarray(beams.tokens[:, 0]) == np.asarray(greedy.tokens), axis=1)
    better = np.asarray(beams.scores[:, 0]) > np.asarray(greedy.scores) + 1e-6
    assert np.all(same | better)
    assert same.any() and better.any()  # both cases occur on this table
    np.testing.assert_allclose(beams.scores[same, 0], greedy.scores[same], rtol=1e-5)
