"""Quality of sentence embeddings against human judgements and labels (gensim's test data).

(1) Lee et al. (2005): 50 news documents (`lee.cor`) and their pairwise human similarity
    ratings (`similarities0-1.txt`): Pearson correlation over the 1,225 pairs between the
    model's cosine similarities and the ratings, beside TF-IDF cosine (the lexical baseline).
(2) `pang_lee_polarity.cor`: 200 movie-review sentences labelled positive/negative:
    cross-validated accuracy of a logistic-regression probe on the embeddings, beside the
    same probe on TF-IDF vectors and chance (the majority class).

The data comes from gensim's wheel, read as a zip (`pip download --no-deps gensim`; gensim
is never installed). Needs scikit-learn:

    /work/venv-peers/bin/python benchmarks/embedding_quality.py --model ~/.cache/transformer_jax/all-MiniLM-L6-v2
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transformer_jax.search import SentenceEncoder  # noqa: E402

DATA = "gensim/test/test_data/"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/transformer_jax/all-MiniLM-L6-v2"))
    p.add_argument("--gensim-wheel", default=None,
                   help="a gensim wheel (default: fetched once with pip download into --cache)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/transformer_jax/gensim"))
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--json", default="out/benchmarks/embedding_quality.json")
    return p.parse_args()


def gensim_wheel(path: str | None, cache: str) -> str:
    if path:
        return path
    found = sorted(glob.glob(os.path.join(cache, "gensim-*.whl")))
    if found:
        return found[-1]
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "gensim", "-d", tmp],
                       check=True)
        wheel = glob.glob(os.path.join(tmp, "gensim-*.whl"))[0]
        target = os.path.join(cache, os.path.basename(wheel))
        os.replace(wheel, target)
    return target


def read_member(wheel: str, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(DATA + name).decode("latin-1")  # the polarity file is not UTF-8


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def main() -> None:
    args = parse_args()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    wheel = gensim_wheel(args.gensim_wheel, args.cache)
    encoder = SentenceEncoder.load(args.model)
    results = {"benchmark": "embedding_quality", "model": encoder.name, "gensim_wheel": os.path.basename(wheel),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    # (1) Lee: documents one per line; the ratings a 50 x 50 matrix (upper triangle used)
    docs = [line for line in read_member(wheel, "lee.cor").splitlines() if line.strip()]
    human = np.loadtxt(read_member(wheel, "similarities0-1.txt").splitlines())
    pairs = np.triu_indices(len(docs), 1)
    assert human.shape == (len(docs), len(docs)) and len(pairs[0]) == 1225
    model_sim = cosine_matrix(encoder.encode(docs))[pairs]
    tfidf = TfidfVectorizer().fit_transform(docs).toarray()
    tfidf_sim = cosine_matrix(tfidf)[pairs]
    lee = {"pairs": len(pairs[0]), "model": float(np.corrcoef(model_sim, human[pairs])[0, 1]),
           "tfidf": float(np.corrcoef(tfidf_sim, human[pairs])[0, 1])}
    results["lee_pearson"] = lee
    print(f"(1) Lee et al. 2005, {lee['pairs']} document pairs: Pearson with human ratings "
          f"{encoder.name} {lee['model']:.3f}, TF-IDF cosine {lee['tfidf']:.3f}")

    # (2) polarity probe
    rows = [line.split(" ", 1) for line in read_member(wheel, "pang_lee_polarity.cor").splitlines() if line.strip()]
    labels = np.array([label == "__label__pos" for label, _ in rows], int)
    sentences = [text.strip() for _, text in rows]
    folds = StratifiedKFold(args.folds, shuffle=True, random_state=0)
    probe = LogisticRegression(max_iter=2000)
    embedded = cross_val_score(probe, encoder.encode(sentences), labels, cv=folds)
    # TF-IDF fitted inside each fold, on its training sentences only
    lexical = cross_val_score(make_pipeline(TfidfVectorizer(), probe), sentences, labels, cv=folds)
    chance = max(labels.mean(), 1 - labels.mean())
    polarity = {"sentences": len(sentences), "folds": args.folds, "model": float(embedded.mean()),
                "model_std": float(embedded.std()), "tfidf": float(lexical.mean()), "chance": float(chance)}
    results["polarity_accuracy"] = polarity
    print(f"(2) polarity, {len(sentences)} sentences, {args.folds}-fold logistic regression: "
          f"{encoder.name} {embedded.mean():.3f} (+/- {embedded.std():.3f}), TF-IDF {lexical.mean():.3f}, "
          f"chance {chance:.3f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
