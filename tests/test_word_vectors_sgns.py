"""word2vec pieces against float64 NumPy references: vocabulary and subsampling formulas,
the negative-sampling losses, their gradients and the scatter-add SGD update, and the
batches' window / sentence / noise rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.word_vectors import corpus as corpus_lib
from transformer_jax.word_vectors import sgns
from transformer_jax.word_vectors.vocabulary import build_vocabulary, tokenize


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_tokenize_and_vocabulary_counts_and_order():
    text = "The cat sat.\nthe dog, the cat!\n\nDon't stop-gap 42"
    sentences = tokenize(text, lowercase=True)
    assert sentences == [["the", "cat", "sat"], ["the", "dog", "the", "cat"], ["don't", "stop-gap", "42"]]
    vocab = build_vocabulary(sentences, min_count=2)
    assert vocab.words == ("the", "cat") and vocab.counts.tolist() == [3, 2]
    assert tokenize("A b", lowercase=False) == [["A", "b"]]
    assert tokenize("a b c d e", max_sentence_length=2) == [["a", "b"], ["c", "d"], ["e"]]


def test_keep_probabilities_and_noise_match_the_formulas():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 1000, size=30)
    sentences = [[f"w{i}"] * int(c) for i, c in enumerate(counts)]
    vocab = build_vocabulary(sentences, min_count=1)
    c = vocab.counts.astype(np.float64)
    t = 1e-2 * c.sum()
    np.testing.assert_allclose(vocab.keep_probabilities(1e-2), np.minimum(1, (np.sqrt(c / t) + 1) * t / c))
    np.testing.assert_array_equal(vocab.keep_probabilities(0), 1.0)
    np.testing.assert_allclose(vocab.noise_distribution(), c ** 0.75 / (c ** 0.75).sum())


@pytest.mark.parametrize("text", ["", " \n ,;! \n"])
def test_empty_corpus_is_refused(text):
    with pytest.raises(ValueError, match="corpus is empty"):
        tokenize(text)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_vocabulary([[], []], min_count=1)


def test_min_count_that_empties_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="min_count=5 leaves an empty vocabulary.*occurs 2 times"):
        build_vocabulary(tokenize("a a b c"), min_count=5)
    with pytest.raises(ValueError, match="min_count"):
        build_vocabulary(tokenize("a a b c"), min_count=0)


def test_encode_corpus_drops_unknown_words_and_keeps_sentences(tmp_path):
    sentences = tokenize("a b x\nx x\nb a a")
    vocab = build_vocabulary(sentences, min_count=2)  # a:3, x:3, b:2 -> sorted (a, x, b)
    for cache in (None, tmp_path):
        enc = corpus_lib.encode_corpus(sentences, vocab, cache)
        assert [vocab.words[i] for i in enc.ids] == ["a", "b", "x", "x", "x", "b", "a", "a"]
        assert enc.sentence.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    again = corpus_lib.encode_corpus(sentences, vocab, tmp_path)  # read from the cache
    assert isinstance(again.ids, np.memmap) and again.ids.tolist() == enc.ids.tolist()


def _random_batch(rng, b, c, k, v, cbow, shared=False):
    centre = rng.integers(0, v, b)
    context = rng.integers(0, v, (b, c))
    context_mask = rng.random((b, c)) < 0.7
    context_mask[0] = False  # a centre without context
    neg_shape = (b, k) if cbow else (b, c, k)
    negatives = rng.integers(0, v, (b, k) if shared or cbow else neg_shape)
    negative_mask = rng.random(neg_shape) < 0.8
    if cbow:
        negative_mask &= context_mask.any(1, keepdims=True)
    else:
        negative_mask &= context_mask[..., None]
    return sgns.Batch(*(jnp.asarray(x) for x in (centre, context, context_mask, negatives, negative_mask)))


def _reference_update(w_in, w_out, batch, lr, cbow, rule):
    """float64 NumPy, term by term as word2vec.c writes it: the summed loss and the tables
    after one step. Each term ``-log s(+-a.b)`` of a row ``a`` adds ``(s(a.b) - label) b`` to
    its gradient, ``s'(a.b) |b|^2`` to its curvature and 1 to its number of updates; CBOW's
    context words each get the full error of ``h`` (word2vec's neu1e)."""
    w_in, w_out = np.array(w_in, np.float64), np.array(w_out, np.float64)
    g = {"in": np.zeros_like(w_in), "out": np.zeros_like(w_out)}
    curv = {"in": np.zeros(len(w_in)), "out": np.zeros(len(w_out))}
    hits = {"in": np.zeros(len(w_in)), "out": np.zeros(len(w_out))}
    centre, context, cmask, neg, nmask = (np.asarray(x) for x in batch)
    loss = 0.0

    def term(a, b, label):
        s = _sigmoid(a @ b)
        return -(np.log(s) if label else np.log(1 - s)), (s - label) * b, s * (1 - s) * (b @ b)

    for i in range(len(centre)):
        if cbow:
            ctx = context[i][cmask[i]]
            if len(ctx) == 0:
                continue
            h = w_in[ctx].mean(0)
            targets = [(centre[i], 1.0)] + [(n, 0.0) for n, m in zip(neg[i], nmask[i]) if m]
            neu1e, h_curv = np.zeros_like(h), 0.0
            for t, label in targets:
                l, grad_h, c_h = term(h, w_out[t], label)
                _, grad_t, c_t = term(w_out[t], h, label)
                loss += l
                neu1e += grad_h
                h_curv += c_h
                g["out"][t] += grad_t
                curv["out"][t] += c_t
                hits["out"][t] += 1
            for cw in ctx:  # the full neu1e, not neu1e / len(ctx)
                g["in"][cw] += neu1e
                curv["in"][cw] += h_curv
                hits["in"][cw] += 1
        else:
            c = centre[i]
            for j in range(context.shape[1]):
                if not cmask[i, j]:
                    continue
                noise = neg[i] if neg.ndim == 2 else neg[i, j]  # shared by the centre's pairs, or per pair
                targets = [(context[i, j], 1.0)] + [(n, 0.0) for n, m in zip(noise, nmask[i, j]) if m]
                for t, label in targets:
                    l, grad_c, c_c = term(w_in[c], w_out[t], label)
                    _, grad_t, c_t = term(w_out[t], w_in[c], label)
                    loss += l
                    g["in"][c] += grad_c
                    curv["in"][c] += c_c
                    hits["in"][c] += 1
                    g["out"][t] += grad_t
                    curv["out"][t] += c_t
                    hits["out"][t] += 1
    scale = {k: (1.0 / (1.0 + lr * curv[k]) if rule == "implicit"
                 else 1.0 / np.maximum(hits[k], 1.0) if rule == "mean" else np.ones_like(curv[k]))
             for k in g}
    return loss, w_in - lr * scale["in"][:, None] * g["in"], w_out - lr * scale["out"][:, None] * g["out"]


@pytest.mark.parametrize("cbow,shared,rule", [
    (False, False, "implicit"), (True, False, "implicit"), (False, True, "implicit"),
    (False, False, "sum"), (True, False, "sum"), (True, False, "mean"), (False, True, "mean")])
def test_sgd_update_matches_numpy_word2vec_rule(cbow, shared, rule):
    rng = np.random.default_rng(1 + cbow + 2 * shared)
    v, d = 7, 5  # few words: repeated rows in the batch exercise the scatter-add
    batch = _random_batch(rng, b=6, c=4, k=3, v=v, cbow=cbow, shared=shared)
    params = {"input": jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float32),
              "output": jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float32)}
    new, loss, pairs = jax.jit(sgns.sgd_update, static_argnames=("cbow", "row_rule"))(
        params, batch, 0.1, cbow=cbow, row_rule=rule)
    ref_loss, ref_in, ref_out = _reference_update(params["input"], params["output"], batch, 0.1, cbow, rule)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["input"]), ref_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["output"]), ref_out, rtol=1e-5, atol=1e-6)
    expected_pairs = np.asarray(batch.context_mask).any(1).sum() if cbow else np.asarray(batch.context_mask).sum()
    assert int(pairs) == expected_pairs


def test_batches_respect_window_sentences_and_noise():
    rng = np.random.default_rng(3)
    n, v, window = 200, 11, 3
    ids = rng.integers(0, v, n)
    sentence = np.sort(rng.integers(0, 12, n))
    keep = np.full(v, 1.0)
    keep[0] = 0.0  # word 0 is always subsampled away
    data = sgns.epoch_data(ids, sentence, keep, seed=5, epoch=2)
    n_kept = int(data.n_kept)
    stream, sent = np.asarray(data.stream)[:n_kept], np.asarray(data.sentence)[:n_kept]
    np.testing.assert_array_equal(stream, ids[ids != 0])
    np.testing.assert_array_equal(sent, sentence[ids != 0])
    assert sorted(np.asarray(data.order)[:n_kept].tolist()) == list(range(n_kept))
    noise = np.zeros(v)
    noise[[2, 5]] = [0.25, 0.75]
    cdf = sgns.noise_cdf(noise)
    b = jax.jit(sgns.make_batch, static_argnames=("batch_size", "window", "negatives", "cbow"))(
        data, cdf, 5, 9, 1, batch_size=64, window=window, negatives=4, cbow=False)
    pos = np.asarray(data.order)[(64 + np.arange(64)) % n_kept]
    np.testing.assert_array_equal(np.asarray(b.centre), stream[pos])
    offsets = np.r_[np.arange(-window, 0), np.arange(1, window + 1)]
    mask = np.asarray(b.context_mask)
    for i in range(64):
        for j, o in enumerate(offsets):
            p = pos[i] + o
            possible = 0 <= p < n_kept and sent[p] == sent[pos[i]]
            assert not mask[i, j] or possible
            if mask[i, j]:
                assert b.context[i, j] == stream[p]
        # dynamic window: the valid offsets on each side form a contiguous run from the centre
        reach = max([abs(o) for o, m in zip(offsets, mask[i]) if m], default=0)
        for j, o in enumerate(offsets):
            p = pos[i] + o
            if abs(o) <= reach and 0 <= p < n_kept and sent[p] == sent[pos[i]]:
                assert mask[i, j]
    assert set(np.unique(np.asarray(b.negatives))) <= {2, 5}
    nm = np.asarray(b.negative_mask)
    assert not (nm & (np.asarray(b.negatives) == np.asarray(b.context)[..., None])).any()
    assert not (nm & ~mask[..., None]).any()
    frac5 = (np.asarray(b.negatives) == 5).mean()
    assert 0.65 < frac5 < 0.85


def test_shared_negatives_are_one_draw_per_centre():
    rng = np.random.default_rng(4)
    ids, sentence = rng.integers(0, 6, 100), np.zeros(100, int)
    data = sgns.epoch_data(ids, sentence, np.ones(6), seed=0, epoch=0)
    cdf = sgns.noise_cdf(np.full(6, 1 / 6))
    b = sgns.make_batch(data, cdf, 0, 0, 0, batch_size=8, window=2, negatives=3, cbow=False,
                        shared_negatives=True)
    assert b.negatives.shape == (8, 3) and b.negative_mask.shape == (8, 4, 3)
    expected = (np.asarray(b.negatives)[:, None, :] != np.asarray(b.context)[..., None]) \
        & np.asarray(b.context_mask)[..., None]
    np.testing.assert_array_equal(np.asarray(b.negative_mask), expected)


def _planted_batch(rng, b, c, k, v):
    """Two planted topics: a centre in words [0, v/2) has context from the same half only;
    negatives uniform over all words (skip-gram, per-pair noise)."""
    half = v // 2
    centre = rng.integers(0, v, b)
    context = rng.integers(0, half, (b, c)) + (centre >= half)[:, None] * half
    negatives = rng.integers(0, v, (b, c, k))
    return sgns.Batch(*(jnp.asarray(x) for x in (centre, context, np.ones((b, c), bool),
                                                  negatives, np.ones((b, c, k), bool))))


@pytest.mark.parametrize("rule,stable", [("implicit", True), ("sum", False)])
def test_huge_batch_for_the_vocabulary_stays_finite_and_separates_topics(rule, stable):
    """A batch hitting each of 8 rows ~2,000 times: summed SGD steps ("sum", the old rule)
    overshoot and blow up; the implicit per-row step learns the two planted topics."""
    rng = np.random.default_rng(0)
    v, d = 8, 6
    params = sgns.init_tables(jax.random.PRNGKey(0), v, d)
    update = jax.jit(sgns.sgd_update, static_argnames=("cbow", "row_rule"))
    losses = []
    for _ in range(12):
        params, loss, pairs = update(params, _planted_batch(rng, 512, 4, 3, v), 0.025, cbow=False, row_rule=rule)
        losses.append(float(loss) / float(pairs))
    w = np.asarray(params["input"], np.float64)
    finite = np.isfinite(w).all() and np.isfinite(losses).all()
    if not stable:
        assert not finite or max(losses[6:]) > losses[0]  # the old rule's failure, so the test can tell
        return
    assert finite and losses[-1] < 0.8 * losses[0]
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = np.equal.outer(np.arange(v) < v // 2, np.arange(v) < v // 2)
    off = ~np.eye(v, dtype=bool)
    assert cos[same & off].min() > cos[~same].max()


def test_default_rate_grows_with_the_square_root_of_the_batch_and_row_update_is_checked():
    from transformer_jax.word_vectors.config import WordVectorConfig
    assert WordVectorConfig(objective="cbow", batch_size=512).lr == 0.05
    assert WordVectorConfig(objective="skipgram", batch_size=1024).lr == 0.05
    assert WordVectorConfig(objective="skipgram", batch_size=16384).lr == pytest.approx(0.05 * 4)
    assert WordVectorConfig(objective="glove", batch_size=65536).lr == 0.05
    assert WordVectorConfig(batch_size=16384, learning_rate=0.01).lr == 0.01
    assert WordVectorConfig.from_dict(WordVectorConfig(row_update="mean").to_dict()).row_update == "mean"
    with pytest.raises(ValueError, match="row_update='avg': expected one of"):
        WordVectorConfig(row_update="avg")
