"""Command line of semantic search: `embed` builds an index from texts, `search` queries it.

    python -m transformer_jax.search embed docs.txt --model all-MiniLM-L6-v2 --index docs.index
    python -m transformer_jax.search search --index docs.index "read a compressed file" -k 3 [--json]

Each subcommand is an `add_*_arguments(parser)` / `*_main(args) -> int` pair, so another
command line (train.py) can mount it as its own subcommand.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from transformer_jax.search.encoder import SentenceEncoder
from transformer_jax.search.index import METRICS, VectorIndex


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive int")
    return value


# ------------------------------------------------------------------------- embed


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `embed`: documents in, index file out."""
    parser.add_argument("input", help="a text file (one document per line; blank lines skipped) or a "
                                      "folder (one document per file, searched recursively)")
    parser.add_argument("--model", required=True,
                        help="a sentence-transformers / Hugging Face directory, or a train.py run "
                             "directory (--objective mlm or classify)")
    parser.add_argument("--index", required=True, help="the index file to write (replaced atomically)")
    parser.add_argument("--metric", choices=METRICS, default="cosine",
                        help="cosine similarity, or inner product")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass")
    parser.add_argument("--append", action="store_true",
                        help="add the documents to the existing --index (same model) instead of replacing it")
    parser.add_argument("--pattern", default="*",
                        help="folder input: only files whose name matches this glob (e.g. '*.txt')")


def embed_main(args: argparse.Namespace) -> int:
    """Encode the documents of `args.input` and write (or extend) the index `args.index`."""
    ids, texts = read_documents(args.input, args.pattern)
    encoder = SentenceEncoder.load(args.model)
    index = VectorIndex.load(args.index, model=encoder.stamp) if args.append else None
    vectors = encoder.encode(texts, batch_size=args.batch_size)
    if index is None:
        index = VectorIndex(vectors, ids=ids, texts=texts, metric=args.metric, model=encoder.stamp)
    else:
        index.add(vectors, ids=ids, texts=texts)
    index.save(args.index)
    print(f"indexed {len(texts)} documents ({len(index)} in all, {index.dim}-d, {index.metric}) "
          f"with {encoder.name} into {args.index}", file=sys.stderr)
    return 0


def read_documents(source: str, pattern: str = "*") -> tuple[list, list[str]]:
    """(ids, texts): a file gives its non-blank lines (ids: 1-based line numbers), a folder
    its files matching `pattern` (ids: paths relative to the folder, sorted)."""
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            pairs = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    elif os.path.isdir(source):
        import fnmatch

        pairs = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                if fnmatch.fnmatch(name, pattern):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as f:
                        try:
                            text = f.read()
                        except UnicodeDecodeError as e:
                            raise ValueError(f"{path!r} is not UTF-8 text ({e}); narrow the files "
                                             f"with --pattern") from None
                    if text.strip():
                        pairs.append((os.path.relpath(path, source), text))
    else:
        raise FileNotFoundError(f"no file or folder at {source!r}")
    if not pairs:
        raise ValueError(f"{source!r} holds no documents (no non-blank "
                         f"{'line' if os.path.isfile(source) else 'file matching ' + repr(pattern)})")
    return [i for i, _ in pairs], [t for _, t in pairs]


# ------------------------------------------------------------------------ search


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `search`: an index and queries in, the top k out."""
    parser.add_argument("queries", nargs="+", help="one or more query texts")
    parser.add_argument("--index", required=True, help="an index file written by `embed`")
    parser.add_argument("-k", "--top-k", type=_positive_int, default=5, help="results per query")
    parser.add_argument("--model", default=None,
                        help="the encoder (default: the directory the index was built from); "
                             "it must have the index's weights")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: {query: [{rank, id, score, text}]}")


def search_main(args: argparse.Namespace) -> int:
    """Print the `args.top_k` nearest documents of each query, with their scores."""
    queries = [q for q in args.queries]
    if not all(q.strip() for q in queries):
        raise ValueError("a query is empty: expected text to search for")
    index = VectorIndex.load(args.index)
    model = args.model or (index.model.path if index.model is not None else None)
    if model is None:
        raise ValueError(f"{args.index!r} records no model: pass --model")
    encoder = SentenceEncoder.load(model)
    scores, ids = index.search_texts(encoder, queries, args.top_k)
    row_of = {i: r for r, i in enumerate(index.ids)}
    texts = index.texts
    results = {}
    for query, query_scores, query_ids in zip(queries, scores, ids):
        results[query] = [
            {"rank": rank, "id": _plain(i), "score": float(s),
             "text": None if texts is None else texts[row_of[_plain(i)]]}
            for rank, (s, i) in enumerate(zip(query_scores, query_ids), 1)]
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
        return 0
    for query, hits in results.items():
        print(f"query: {query}")
        for hit in hits:
            text = "" if hit["text"] is None else " ".join(hit["text"].split())
            print(f"  {hit['rank']:>2}. {hit['score']:.4f}  {hit['id']}  {text[:100]}")
    return 0


def _plain(value):
    """NumPy scalars as Python ints/strs (for JSON and dictionary keys)."""
    return value.item() if hasattr(value, "item") else value


# -------------------------------------------------------------------------- main

COMMANDS = {"embed": (add_embed_arguments, embed_main, "build an index from a file or folder of texts"),
            "search": (add_search_arguments, search_main, "query an index, print the top k with scores")}


def build_parser(prog: str = "python -m transformer_jax.search") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m transformer_jax.search {embed,search} ...`; errors print one line, exit 1."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
