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

from transformer_jax.config import get_config
from transformer_jax.generation import beam, generate, loop, processors
from transformer_jax.models import DecoderLM, EncoderDecoder

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


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_id"))
def run_decode(table, contexts, rng=None, temperature=1.0, top_k=VOCAB, top_p=1.0, *,
               max_new_tokens, eos_id):
    """Greedy decoding when rng is None, else sampling (top_k=VOCAB, top_p=1 filter
    nothing, so every sampling test shares a compilation)."""
    cache, logits = trigram_start(table, contexts)
    if rng is None:
        select = loop.greedy_select
    else:
        select = loop.sampling_select(rng, temperature=temperature, top_k=top_k, top_p=top_p)
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
    out = run_decode(table, contexts, max_new_tokens=6, eos_id=EOS)
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
    greedy = run_decode(table, contexts, max_new_tokens=6, eos_id=EOS)
    sampled = run_decode(table, contexts, jax.random.key(3), temperature=1.7, top_k=1,
                         max_new_tokens=6, eos_id=EOS)
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
    out = run_decode(table, contexts, jax.random.key(5), temperature, top_k or VOCAB, top_p or 1.0,
                     max_new_tokens=2, eos_id=None)
    first = reference_kept(table[context], temperature, top_k, top_p)
    joint = np.stack([first[a] * reference_kept(table[context[1], a], temperature, top_k, top_p)
                      for a in range(VOCAB)])
    tokens = np.asarray(out.tokens)
    assert_frequencies_match(tokens[:, 0] * VOCAB + tokens[:, 1], joint.reshape(-1))


def test_sampling_is_reproducible_given_the_key():
    table = trigram_table(6, scale=0.5)
    contexts = np.array(list(itertools.product(range(VOCAB), repeat=2)), np.int32)
    run = functools.partial(run_decode, table, contexts, max_new_tokens=6, eos_id=EOS)
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
    greedy = run_decode(table, contexts, max_new_tokens=6, eos_id=EOS)
    beams = run_beam(table, contexts, 0.0, num_beams=1, max_new_tokens=6)
    same = np.all(np.asarray(beams.tokens[:, 0]) == np.asarray(greedy.tokens), axis=1)
    better = np.asarray(beams.scores[:, 0]) > np.asarray(greedy.scores) + 1e-6
    assert np.all(same | better)
    assert same.any() and better.any()  # both cases occur on this table
    np.testing.assert_allclose(beams.scores[same, 0], greedy.scores[same], rtol=1e-5)


# ------------------------------------------------------------------ model level
NEW = 6  # new tokens per row in the model-level tests
WIDTH = 5  # padded prompt width


def random_params(model, *inputs, seed, std=0.5):
    """Random parameters of the init's shapes, without compiling `init`: weights
    Normal(0, std), norm scales 1, biases 0. Large enough that the tiny models'
    next-token distributions are peaked and input-dependent (a near-uniform model would
    mostly repeat one token and hide bugs)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        # the parameter's name; leaves boxed in nn.LogicallyPartitioned end in `.value`
        name = path[-1].key if hasattr(path[-1], "key") else path[-2].key
        if name in ("bias", "scale"):
            return jnp.full(shape.shape, float(name == "scale"), shape.dtype)
        return jnp.asarray(std * rng.standard_normal(shape.shape), shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def padded_batch(seed, lengths, vocab):
    """Right-padded prompts [batch, WIDTH] with random ids, *including* in the padding,
    which generate must ignore."""
    return np.random.default_rng(seed).integers(0, vocab, (len(lengths), WIDTH)).astype(np.int32)


@pytest.fixture(scope="module")
def lm():
    """A tiny DecoderLM (rotary positions, grouped-query attention), a padded batch, and
    a from-scratch forward pass: full uncached apply over a fixed-width buffer."""
    cfg = get_config("tiny", pos_encoding="rotary", num_kv_heads=2)
    model = DecoderLM(cfg)
    params = random_params(model, jnp.zeros((1, 4), jnp.int32), seed=0)
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    lengths = np.array([5, 2, 3], np.int32)
    prompts = padded_batch(1, lengths, cfg.vocab_size)
    return model, params, forward, prompts, lengths


def from_scratch_log_probs(forward, context, max_len, vocab):
    """log-softmax of the next-token logits after `context`, float64, from a full
    forward pass over the context (causal, so the random filler after it is unseen)."""
    filler = np.random.default_rng(len(context)).integers(0, vocab, max_len - len(context))
    buffer = np.concatenate([context, filler]).astype(np.int32)[None]
    return log_softmax64(forward(jnp.asarray(buffer))[0, len(context) - 1])


def reference_greedy_lm(forward, prompt, max_new_tokens, eos_id, max_len, vocab):
    """Greedy decoding recomputing the full forward pass from scratch at every step."""
    context, tokens, score = list(prompt), [], 0.0
    for _ in range(max_new_tokens):
        log_probs = from_scratch_log_probs(forward, context, max_len, vocab)
        token = int(np.argmax(log_probs))
        tokens.append(token)
        score += log_probs[token]
        context.append(token)
        if token == eos_id:
            break
    return tokens, score


@pytest.fixture(scope="module")
def lm_eos(lm):
    """An EOS id that row 0's greedy continuation emits at its 3rd step, so EOS
    handling is exercised on a real model (other rows may run to the budget)."""
    model, _, forward, prompts, lengths = lm
    cfg = model.cfg
    tokens, _ = reference_greedy_lm(forward, prompts[0, :lengths[0]], 3, None, cfg.max_len, cfg.vocab_size)
    assert tokens[2] not in tokens[:2], "pick another seed: EOS would end row 0 earlier"
    return tokens[2]


def test_greedy_equals_argmax_of_full_forward_each_step(lm, lm_eos):
    model, params, forward, prompts, lengths = lm
    cfg = model.cfg
    out = generate(model, params, prompts, prompt_lengths=lengths, max_new_tokens=NEW, eos_id=lm_eos,
                   pad_id=PAD)
    assert out.tokens.shape == (3, NEW) and out.lengths.shape == (3,) and out.scores.shape == (3,)
    for row, length in enumerate(lengths):
        want, score = reference_greedy_lm(forward, prompts[row, :length], NEW, lm_eos, cfg.max_len,
                                          cfg.vocab_size)
        assert out.tokens[row].tolist() == padded(want, NEW)
        assert int(out.lengths[row]) == len(want)
        np.testing.assert_allclose(float(out.scores[row]), score, rtol=1e-4)
    assert int(out.lengths[0]) == 3


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_cached_and_uncached_decoding_agree(lm, lm_eos, strategy):
    model, params, _, prompts, lengths = lm
    options = dict(prompt_lengths=lengths, max_new_tokens=NEW, eos_id=lm_eos, strategy=strategy,
                   temperature=0.7, top_k=20, top_p=0.9, rng=3, num_beams=3, return_all_beams=True)
    cached = generate(model, params, prompts, **options)
    uncached = generate(model, params, prompts, use_cache=False, **options)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.lengths, uncached.lengths)
    np.testing.assert_allclose(cached.scores, uncached.scores, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batch_with_padding_equals_one_prompt_at_a_time(lm, lm_eos, strategy):
    model, params, _, prompts, lengths = lm
    options = dict(max_new_tokens=NEW, eos_id=lm_eos, strategy=strategy, num_beams=3,
                   return_all_beams=True)
    batch = generate(model, params, prompts, prompt_lengths=lengths, **options)
    for row, length in enumerate(lengths):
        # The same width (one compilation), other padding ids, batch size 1.
        alone = padded_batch(10 + row, [length], model.cfg.vocab_size)
        alone[0, :length] = prompts[row, :length]
        alone = generate(model, params, alone, prompt_lengths=lengths[row:row + 1], **options)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
        np.testing.assert_array_equal(alone.lengths[0], batch.lengths[row])
        np.testing.assert_allclose(alone.scores[0], batch.scores[row], rtol=1e-4)


def test_beam_scores_are_the_length_penalised_log_probs_of_the_beams(lm, lm_eos):
    """Recomputes every returned beam's log-probability from scratch: wrong cache
    reordering between beams would make these disagree."""
    model, params, forward, prompts, lengths = lm
    cfg = model.cfg
    out = generate(model, params, prompts, prompt_lengths=lengths, max_new_tokens=NEW, eos_id=lm_eos,
                   strategy="beam", num_beams=3, return_all_beams=True)
    greedy = generate(model, params, prompts, prompt_lengths=lengths, max_new_tokens=NEW, eos_id=lm_eos)
    for row, length in enumerate(lengths):
        for j in range(3):
            n = int(out.lengths[row, j])
            tokens = out.tokens[row, j].tolist()
            assert tokens[n:] == [PAD] * (NEW - n)
            assert (tokens[n - 1] == lm_eos) or n == NEW
            context, log_prob = list(prompts[row, :length]), 0.0
            for token in tokens[:n]:
                log_prob += from_scratch_log_probs(forward, context, cfg.max_len, cfg.vocab_size)[token]
                context.append(token)
            np.testing.assert_allclose(float(out.scores[row, j]), log_prob / n, rtol=1e-4)
        assert np.all(np.diff(np.asarray(out.scores[row])) <= 0)  # best first
        # Greedy's hypothesis is one beam search considered (length penalty 1.0 here).
        assert float(out.scores[row, 0]) >= float(greedy.scores[row]) / int(greedy.lengths[row]) - 1e-5


def test_top_k_one_and_one_beam_equal_greedy_and_sampling_is_seeded(lm, lm_eos):
    model, params, _, prompts, lengths = lm
    options = dict(prompt_lengths=lengths, max_new_tokens=NEW, eos_id=lm_eos)
    greedy = generate(model, params, prompts, **options)
    sample = functools.partial(generate, model, params, prompts, strategy="sample", temperature=0.7,
                               top_k=20, top_p=0.9, **options)  # the compilation of the test above
    top_1 = sample(top_k=1, temperature=1.5, top_p=1.0, rng=4)
    np.testing.assert_array_equal(top_1.tokens, greedy.tokens)
    one_beam = generate(model, params, prompts, strategy="beam", num_beams=1, **options)
    np.testing.assert_array_equal(one_beam.tokens, greedy.tokens)
    a, b, c = sample(rng=5), sample(rng=jax.random.key(5)), sample(rng=6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("bad,match", [
    (dict(prompts=[]), "empty batch"),
    (dict(prompts=[[1, 2], []]), "no empty prompts"),
    (dict(prompts=[[1, 61]]), r"\[0, 61\)"),
    (dict(prompts=[[-1, 2]]), r"\[0, 61\)"),
    (dict(prompts=[[1] * 12], max_new_tokens=6), "max_len=16"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(strategy="nucleus"), "strategy"),
    (dict(strategy="sample", top_p=0.0), "top_p"),
    (dict(strategy="sample", top_p=1.5), "top_p"),
    (dict(strategy="sample", top_k=0), "top_k"),
    (dict(strategy="sample", temperature=0.0), "temperature"),
    (dict(strategy="sample", rng=None), "rng"),
    (dict(strategy="beam", num_beams=0), "num_beams"),
    (dict(eos_id=61), "eos_id"),
    (dict(rng="seed"), "rng"),
    (dict(prompts=np.ones((2, 3), np.int32), prompt_lengths=[3, 4]), "lengths"),
    (dict(prompts=np.ones((2, 3), np.float32)), "integer array"),
    (dict(prompts=[[1.5, 2]]), "int token ids"),
])
def test_bad_input_raises_before_compiling(lm, bad, match):
    model, params, *_ = lm
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=5, strategy="sample", rng=0) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, params, args.pop("prompts"), **args)


# ----------------------------------------------------------------- EncoderDecoder
@pytest.fixture(scope="module")
def seq2seq():
    """A tiny EncoderDecoder with scanned layers (cache batch on axis 1), padded sources."""
    cfg = get_config("tiny", scan_layers=True)
    model = EncoderDecoder(cfg)
    src = jnp.zeros((1, WIDTH), jnp.int32)
    params = random_params(model, src, jnp.zeros((1, NEW), jnp.int32), seed=1)
    forward = jax.jit(lambda src, mask, tgt: model.apply({"params": params}, src, tgt, src_padding_mask=mask))
    lengths = np.array([4, 5, 2], np.int32)
    return model, params, forward, padded_batch(2, lengths, cfg.vocab_size), lengths


def test_encoder_decoder_greedy_equals_argmax_of_full_forward(seq2seq):
    model, params, forward, sources, lengths = seq2seq
    bos = 1
    out = generate(model, params, sources, prompt_lengths=lengths, max_new_tokens=NEW, bos_id=bos)
    for row, length in enumerate(lengths):
        src = jnp.asarray(sources[row:row + 1])
        mask = jnp.arange(WIDTH)[None] < length
        target, score = [bos], 0.0
        for _ in range(NEW):  # the full model (encoder too) recomputed at every step
            tgt = jnp.asarray(padded(target, NEW))[None]
            log_probs = log_softmax64(forward(src, mask, tgt)[0, len(target) - 1])
            target.append(int(np.argmax(log_probs)))
            score += log_probs[target[-1]]
        assert out.tokens[row].tolist() == target[1:]
        np.testing.assert_allclose(float(out.scores[row]), score, rtol=1e-4)
    assert len({tuple(t) for t in out.tokens.tolist()}) == 3  # the sources matter


def test_encoder_decoder_beam_cached_uncached_and_alone_agree(seq2seq):
    model, params, _, sources, lengths = seq2seq
    options = dict(max_new_tokens=NEW, bos_id=1, eos_id=EOS, strategy="beam", num_beams=3,
                   return_all_beams=True)
    cached = generate(model, params, sources, prompt_lengths=lengths, **options)
    uncached = generate(model, params, sources, prompt_lengths=lengths, use_cache=False, **options)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_allclose(cached.scores, uncached.scores, rtol=1e-4)
    alone = generate(model, params, sources[2:], prompt_lengths=lengths[2:], **options)
    np.testing.assert_array_equal(alone.tokens[0], cached.tokens[2])
    np.testing.assert_allclose(alone.scores[0], cached.scores[2], rtol=1e-4)
    with pytest.raises(ValueError, match="bos_id"):
        generate(model, params, sources, max_new_tokens=NEW)
