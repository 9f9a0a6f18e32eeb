"""train.py's word-vector objectives (`--objective cbow|skipgram|glove`) and their flags.

Word vectors train through their own loop (`train_word_vectors`): no model, tokenizer or
validation split, so they are not entries of the transformer Objective registry; train.py
adds these flags to its parser and hands such runs to `run`.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

OBJECTIVES = {
    "cbow": "word2vec continuous bag of words (vectors.txt in the run directory)",
    "skipgram": "word2vec skip-gram with negative sampling (vectors.txt)",
    "glove": "GloVe on the corpus's co-occurrence counts (vectors.txt)",
}
WORD_VECTOR_FLAGS = {  # flag dest -> WordVectorConfig field
    "dimension": "dimension", "window": "window", "negatives": "negatives",
    "shared_negatives": "shared_negatives", "min_count": "min_count", "sample": "sample",
    "epochs": "epochs", "x_max": "x_max", "min_lr": "min_learning_rate", "lowercase": "lowercase",
    "lr": "learning_rate", "batch_size": "batch_size", "seed": "seed", "data": "data",
    "log_every": "log_every", "checkpoint_every": "checkpoint_every",
}
WORD_ONLY_FLAGS = {"dimension", "window", "negatives", "shared_negatives", "min_count", "sample", "epochs",
                   "x_max", "min_lr", "lowercase"}
SHARED_FLAGS = {*WORD_VECTOR_FLAGS, "objective", "out_dir", "max_steps", "mesh", "coordinator_address",
                "num_processes", "process_id", "distributed_timeout_s", "compile_cache", "reuse_host_memory",
                "overwrite", "resume"}


def set_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, names) -> list[str]:
    """The flags among dests `names` that the command line set (value differs from the default)."""
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    return [flag[n] for n in sorted(names) if getattr(args, n) != parser.get_default(n)]


def add_arguments(parser: argparse.ArgumentParser, positive_int: Callable, nonneg_float: Callable,
                  positive_float: Callable) -> None:
    """The word-vector flags (argparse types passed in, so train.py's messages stay one kind)."""
    words = parser.add_argument_group("word vectors (--objective cbow, skipgram or glove; they also use --data, "
                                 "--out-dir, --seed, --batch-size, --lr, --max-steps, --log-every, "
                                 "--checkpoint-every, --mesh)")
    words.add_argument("--dimension", type=positive_int, default=None, help="vector size (default: 100)")
    words.add_argument("--window", type=positive_int, default=None,
                       help="context words on each side (word2vec: the largest of a dynamic window; default: 5)")
    words.add_argument("--negatives", type=positive_int, default=None, help="noise words per pair (default: 5)")
    words.add_argument("--shared-negatives", action="store_true",
                       help="skipgram: one draw of noise words per centre instead of per pair (faster)")
    words.add_argument("--min-count", type=positive_int, default=None,
                       help="drop words seen fewer times (default: 5)")
    words.add_argument("--sample", type=nonneg_float, default=None,
                       help="frequent-word subsampling threshold, 0 = off (default: 1e-3)")
    words.add_argument("--epochs", type=positive_int, default=None, help="passes over the corpus (default: 5)")
    words.add_argument("--x-max", type=positive_float, default=None,
                       help="glove: co-occurrence count where the weight reaches 1 (default: 100)")
    words.add_argument("--min-lr", type=positive_float, default=None,
                       help="word2vec: learning rate reached at the end (default: 1e-4)")
    words.add_argument("--no-lowercase", dest="lowercase", action="store_false",
                       help="keep the corpus's case (default: lower-case every word)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`train.py --objective cbow|skipgram|glove`: word vectors into --out-dir/vectors.txt."""
    from transformer_jax import sharding
    from transformer_jax.run.host_memory import reuse_freed_host_memory
    from transformer_jax.word_vectors import WordVectorConfig, train_word_vectors

    unused = set_flags(args, parser, set(vars(args)) - SHARED_FLAGS)
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used by --objective {args.objective} (word vectors)")
    fields = {field: getattr(args, flag) for flag, field in WORD_VECTOR_FLAGS.items()
              if getattr(args, flag) is not None}
    config = WordVectorConfig(objective=args.objective, **fields)
    label = os.path.splitext(os.path.basename(os.path.normpath(config.data)))[0] or "data"
    out_dir = args.out_dir or os.path.join("runs", f"{args.objective}-{label}")
    if args.reuse_host_memory:  # before JAX starts its backends (see run.host_memory)
        reuse_freed_host_memory()
    if args.num_processes or args.coordinator_address:
        sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                        timeout_s=args.distributed_timeout_s)
    mesh = None if args.mesh in (None, "none") else sharding.make_mesh(args.mesh)
    # it says where the vectors went, or which step a stop signal or --max-steps saved
    train_word_vectors(config, out_dir, max_steps=args.max_steps, mesh=mesh, overwrite=args.overwrite,
                       resume=args.resume)
    return 0


