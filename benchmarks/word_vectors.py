"""Word vectors, ours against gensim side by side on one corpus: quality (Spearman on
WordSim353 and SimLex-999 with coverage, Google analogy accuracy) and speed (corpus words/s).

    /work/venv-peers/bin/python benchmarks/word_vectors.py                     # head500, CPU
    /work/venv-peers/bin/python benchmarks/word_vectors.py --data shakespeare
    PYTHONPATH=. python3 benchmarks/word_vectors.py --no-gensim --batch-size 16384 \\
        --eval-dir out/wordvec --data out/wordvec/head500.noblanks.cor --repeat 4     # GPU

Both sides get the same sentences (our tokenizer's output), dimension, window, negatives,
min_count, subsampling threshold and epochs; gensim runs with --workers threads (default 2)
and its defaults otherwise (alpha 0.025 -> 0.0001, cbow_mean=1). Words/s counts every corpus
word (out-of-vocabulary ones too) x epochs: gensim's over ``Word2Vec.train``, ours over the
whole training loop, jit compilation included ("steady": from the first logged step on;
GloVe's co-occurrence count, built before the loop, is not in its time).
``skipgram-shared`` is our skip-gram drawing its negatives once per centre. With gensim
installed, the word2vec text and binary files are checked both ways (gensim reads ours,
we read gensim's). Evaluation data and the head500 corpus
come from gensim's wheel (gensim/test/test_data) or --eval-dir.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformer_jax.word_vectors.config import WordVectorConfig  # noqa: E402
from transformer_jax.word_vectors.keyed_vectors import KeyedVectors  # noqa: E402
from transformer_jax.word_vectors.run import train_word_vectors  # noqa: E402
from transformer_jax.word_vectors.vocabulary import tokenize  # noqa: E402


def gensim_test_data() -> str | None:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.origin:
        return None
    return os.path.join(os.path.dirname(spec.origin), "test", "test_data")


def read_pairs(path: str) -> list[tuple[str, str, float]]:
    """word1<TAB>word2<TAB>score lines; '#' comments skipped; words lower-cased."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b, score = line.rstrip("\n").split("\t")[:3]
            pairs.append((a.lower(), b.lower(), float(score)))
    return pairs


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r
    return float(np.corrcoef(ranks(np.asarray(x)), ranks(np.asarray(y)))[0, 1])


def similarity_score(kv: KeyedVectors, pairs) -> tuple[float, float]:
    """(Spearman over the pairs whose words are both known, coverage)."""
    known = [(a, b, s) for a, b, s in pairs if a in kv and b in kv]
    if len(known) < 3:
        return float("nan"), len(known) / len(pairs)
    model = np.array([kv.similarity(a, b) for a, b, _ in known])
    return spearman(model, np.array([s for *_, s in known])), len(known) / len(pairs)


def analogy_score(kv: KeyedVectors, path: str) -> tuple[float, float]:
    """3CosAdd accuracy on the Google analogies "a b c d" (d = b - a + c, a/b/c excluded)
    over the questions whose four words are known; (accuracy, coverage)."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(":") or not line.strip():
                continue
            questions.append(line.lower().split())
    known = [q for q in questions if all(w in kv for w in q)]
    if not known:
        return float("nan"), 0.0
    ids = np.array([[kv.index[w] for w in q] for q in known])
    unit = kv._unit
    correct = 0
    for start in range(0, len(ids), 1024):
        q = ids[start:start + 1024]
        target = unit[q[:, 1]] - unit[q[:, 0]] + unit[q[:, 2]]
        scores = target @ unit.T
        rows = np.arange(len(q))[:, None]
        scores[rows, q[:, :3]] = -np.inf
        correct += int((scores.argmax(1) == q[:, 3]).sum())
    return correct / len(known), len(known) / len(questions)


def evaluate(kv: KeyedVectors, eval_dir: str | None) -> dict:
    if eval_dir is None or not os.path.isdir(eval_dir):
        return {}
    out = {}
    for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        path = os.path.join(eval_dir, file)
        if os.path.isfile(path):
            out[name], out[f"{name}_coverage"] = similarity_score(kv, read_pairs(path))
    path = os.path.join(eval_dir, "questions-words.txt")
    if os.path.isfile(path):
        out["analogy"], out["analogy_coverage"] = analogy_score(kv, path)
    return out


def run_ours(name: str, text: str, args, n_words: int) -> dict:
    """name: cbow, skipgram, skipgram-shared (skip-gram with shared negatives) or glove."""
    objective = name.replace("-shared", "")
    cfg = WordVectorConfig(
        objective=objective, dimension=args.dimension, window=args.window, negatives=args.negatives,
        min_count=args.min_count, sample=args.sample if objective != "glove" else 0.0,
        epochs=args.glove_epochs if objective == "glove" else args.epochs,
        batch_size=args.glove_batch_size if objective == "glove" else args.batch_size,
        shared_negatives=name == "skipgram-shared",
        seed=args.seed, log_every=args.log_every, checkpoint_every=10**9, row_update=args.row_update,
        learning_rate=args.learning_rate if objective != "glove" else None)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        kv = train_word_vectors(cfg, out, text=text, progress=False)
        total = time.perf_counter() - t0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    # our metrics count in-vocabulary words; gensim's rate counts every corpus word: rescale
    # ours to every corpus word, so the two rates are per the same words
    scale = n_words / float(kv.counts.sum())
    first, last = records[0], records[-1]
    # steady state: from the first logged step on (compilation and warm-up excluded)
    steady = (last["words_per_s"] * last["elapsed_s"] - first["words_per_s"] * first["elapsed_s"]) / max(
        last["elapsed_s"] - first["elapsed_s"], 1e-9) if len(records) > 1 else float("nan")
    return {"kv": kv, "words_per_s": scale * last["words_per_s"], "steady_words_per_s": scale * steady,
            "wall_s": total, "final_loss": last["train_loss"], "epochs": cfg.epochs}


def run_gensim(sg: int, sentences, args, n_words: int) -> dict:
    from gensim.models import Word2Vec
    model = Word2Vec(vector_size=args.dimension, window=args.window, negative=args.negative_gensim,
                     min_count=args.min_count, sample=args.sample, sg=sg, hs=0,
                     workers=args.workers, seed=args.seed)
    model.build_vocab(sentences)
    t0 = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=args.epochs)
    seconds = time.perf_counter() - t0
    g = model.wv
    kv = KeyedVectors(list(g.index_to_key), g.vectors,
                      np.array([g.get_vecattr(w, "count") for w in g.index_to_key]))
    return {"kv": kv, "words_per_s": n_words * args.epochs / seconds, "wall_s": seconds,
            "gensim_model": model, "epochs": args.epochs}


def _aggregate(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each quality figure; speed of the first run."""
    out = dict(runs[0])
    for name in ("wordsim353", "simlex999", "analogy"):
        if name in runs[0]:
            values = np.array([r[name] for r in runs])
            out[name], out[name + "_std"] = float(values.mean()), float(values.std())
            out[name + "_all"] = values.tolist()
    return out


def check_formats(ours: KeyedVectors, gensim_model) -> str:
    """gensim reads our text and binary files exactly, and we read gensim's."""
    from gensim.models import KeyedVectors as GensimKV
    with tempfile.TemporaryDirectory() as d:
        for binary in (False, True):
            path = os.path.join(d, f"ours.{binary}")
            ours.save_word2vec_format(path, binary=binary)
            theirs = GensimKV.load_word2vec_format(path, binary=binary)
            assert list(theirs.index_to_key) == ours.words, "gensim read other words"
            assert np.array_equal(theirs.vectors, ours.vectors), "gensim read other vectors"
            path = os.path.join(d, f"gensim.{binary}")
            gensim_model.wv.save_word2vec_format(path, binary=binary)
            back = KeyedVectors.load_word2vec_format(path, binary=binary)
            assert back.words == list(gensim_model.wv.index_to_key), "we read other words"
            assert np.array_equal(back.vectors, gensim_model.wv.vectors), "we read other vectors"
    return "gensim reads our text and binary files and we read its: words and float32 vectors identical"


def device_name() -> str:
    import jax
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                          if line.startswith("Model name")), platform.processor())
        except OSError:
            model = platform.processor()
        return f"CPU ({model}, {os.cpu_count()} cores)"
    return f"{dev.platform.upper()} ({dev.device_kind})"


def load_corpus(spec: str, eval_dir: str | None) -> str:
    if spec == "head500":
        if eval_dir is None:
            raise SystemExit("--data head500 needs gensim installed or --eval-dir")
        spec = os.path.join(eval_dir, "head500.noblanks.cor")
    from transformer_jax.data import load_text
    return load_text(spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="head500", help="head500 (gensim's), shakespeare, stdlib or a path")
    p.add_argument("--objectives", default="cbow,skipgram,skipgram-shared,glove",
                   help="of cbow, skipgram, skipgram-shared (ours with shared negatives), glove")
    p.add_argument("--dimension", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sample", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--glove-epochs", type=int, default=None, help="default: --epochs")
    p.add_argument("--batch-size", type=int, default=1024, help="word2vec centres per step")
    p.add_argument("--glove-batch-size", type=int, default=4096)
    p.add_argument("--learning-rate", type=float, default=None, help="word2vec's initial alpha "
                   "(default: ours, WordVectorConfig's: 0.05, times sqrt(batch / 1024) above 1,024; "
                   "gensim keeps its own 0.025)")
    p.add_argument("--row-update", default="implicit", choices=("implicit", "sum", "mean"),
                   help="how one batch's word2vec updates of a row combine (sgns.sgd_update)")
    p.add_argument("--seeds", default="0", help="comma-separated: quality as mean ± std over them")
    p.add_argument("--repeat", type=int, default=1, help="repeat the corpus (longer timing runs)")
    p.add_argument("--log-every", type=int, default=20, help="our steps between metrics records")
    p.add_argument("--workers", type=int, default=2, help="gensim's threads")
    p.add_argument("--no-gensim", action="store_true")
    p.add_argument("--eval-dir", default=None, help="folder with wordsim353.tsv, simlex999.txt, "
                   "questions-words.txt (default: gensim's test_data)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    args.negative_gensim = args.negatives
    args.glove_epochs = args.glove_epochs or args.epochs
    eval_dir = args.eval_dir or gensim_test_data()
    text = load_corpus(args.data, eval_dir) * args.repeat
    sentences = tokenize(text, lowercase=True)
    n_words = sum(len(s) for s in sentences)
    print(f"corpus {args.data}: {n_words} words in {len(sentences)} sentences; device {device_name()}",
          flush=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    gensim_models = {}
    use_gensim = not args.no_gensim and importlib.util.find_spec("gensim") is not None
    for objective in args.objectives.split(","):
        base = objective.replace("-shared", "")
        with_gensim = use_gensim and base in ("cbow", "skipgram") and base not in gensim_models
        runs = {"gensim": [], "ours": []}
        for seed in seeds:
            args.seed = seed
            if with_gensim:
                r = run_gensim(int(base == "skipgram"), sentences, args, n_words)
                gensim_models[base] = r.pop("gensim_model")
                runs["gensim"].append({**r, **evaluate(r["kv"], eval_dir)})
                print(f"gensim {base} seed {seed}: {r['words_per_s']:.0f} words/s", flush=True)
            r = run_ours(objective, text, args, n_words)
            runs["ours"].append({**r, **evaluate(r["kv"], eval_dir)})
            print(f"ours {objective} seed {seed}: {r['words_per_s']:.0f} words/s", flush=True)
        if runs["gensim"]:
            rows.append({"model": f"gensim {base}", **_aggregate(runs["gensim"])})
        rows.append({"model": f"ours {objective}", **_aggregate(runs["ours"])})
    formats = (check_formats(next(r["kv"] for r in rows if r["model"].startswith("ours")),
                             next(iter(gensim_models.values())))
               if gensim_models else "not checked (no gensim)")
    date = datetime.date.today().isoformat()
    print(f"\n{args.data}, d={args.dimension}, window={args.window}, negatives={args.negatives}, "
          f"min_count={args.min_count}, sample={args.sample}, epochs={args.epochs} "
          f"(GloVe {args.glove_epochs}), seeds {seeds}; {device_name()}, {date}")
    print("| model | WordSim353 ρ | SimLex-999 ρ | analogy accuracy | words/s | steady words/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        def cell(name):
            if name not in r:
                return "n/a"
            spread = f" ± {r[name + '_std']:.3f}" if len(seeds) > 1 else ""
            return f"{r[name]:.3f}{spread} ({r[name + '_coverage']:.0%})"
        steady = f"{r['steady_words_per_s']:,.0f}" if "steady_words_per_s" in r else "n/a"
        print(f"| {r['model']} | {cell('wordsim353')} | {cell('simlex999')} | {cell('analogy')} | "
              f"{r['words_per_s']:,.0f} | {steady} |")
    print("(quality: mean ± standard deviation over the seeds, coverage in brackets; "
          "speed: the first seed's run)")
    print(f"formats: {formats}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name(), "date": date, "formats": formats,
                       "rows": [{k: v for k, v in r.items() if k != "kv"} for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
