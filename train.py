"""Train a transformer_jax model end to end, or sample from a trained run.

    python train.py                          # char-level GPT on the Python stdlib (2-core CPU: about 2 min)
    python train.py --data shakespeare --max-steps 5000
    python train.py --objective mlm --out-dir runs/mlm
    python train.py --objective classify --init-from runs/mlm --freeze '^encoder/'
    python train.py sample --prompt "def main("

Each run goes to its own --out-dir (default: runs/<objective>[-<preset>]-<data>);
re-running a command resumes it exactly, and a larger --max-steps extends a finished
run. This file only parses flags into a `transformer_jax.TrainConfig` and calls the
library (`transformer_jax.train`, `load_run`, `generate_text`).

Subcommands: a dict entry in SUBCOMMANDS maps `train.py <name> [flags]` to a
(parser builder, runner) pair.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Callable

USAGE = ("train.py [flags]  |  train.py sample|embed|search [flags]  (train.py sample --help, "
         "train.py embed --help, train.py search --help)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_parser(type_name: str) -> Callable[[str], Any]:
    """argparse type for a ModelConfig field annotated `type_name` (e.g. 'int | None')."""
    base = {"int": int, "float": float, "bool": boolean, "str": str}[type_name.split(" |")[0]]
    if "None" not in type_name:
        return base
    return lambda text: None if text.lower() == "none" else base(text)


def help_with_default(action: argparse.Action) -> str:
    """A flag's help text with "(default: %(default)s)" appended, unless the text states the
    default itself (one that depends on the device or on other flags) or the flag takes no
    value (--resume, --help)."""
    text = action.help or ""
    if action.nargs == 0 or "default" in text:
        return text
    return f"{text} (default: %(default)s)".lstrip()


class HelpFormatter(argparse.HelpFormatter):
    """States every flag's default once (see `help_with_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return help_with_default(action)


_MODEL_FLAG_SKIP = ("dtype", "dropout_rate")  # spelled --dtype and --dropout


def build_parser() -> argparse.ArgumentParser:
    """The training flags; each sets the TrainConfig field of its name (model flags: a
    ModelConfig override). Defaults of None are filled in by `TrainConfig.resolve`."""
    from transformer_jax.config import ModelConfig, list_presets
    from transformer_jax.objectives import get_objective, objective_names
    from transformer_jax.word_vectors import cli as word_vectors_cli

    p = argparse.ArgumentParser(prog="train.py", usage=USAGE, description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="subcommands: sample (generate text from a trained clm run), embed (build a "
                                       "vector index of texts with a sentence encoder), search (query it)")
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=list_presets(), default=None,
                     help="model preset (default: a small char model on CPU, char-small on accelerators)")
    run.add_argument("--objective", choices=[*objective_names(), *word_vectors_cli.OBJECTIVES], default="clm",
                     help="; ".join([*(f"{n}: {get_objective(n).description}" for n in objective_names()),
                                     *(f"{n}: {text}" for n, text in word_vectors_cli.OBJECTIVES.items())]))
    run.add_argument("--data", default=None,
                     help="'stdlib', 'shakespeare', a text file/folder, or a TSV file (seq2seq, "
                          "classify); default: stdlib, or a synthetic task for seq2seq/classify")
    run.add_argument("--tokenizer", default="char", help="char | byte | bpe | path to tokenizer.json")
    run.add_argument("--out-dir", default=None,
                     help="run directory (default: runs/<objective>[-<preset>]-<data>)")
    run.add_argument("--init-from", default=None,
                     help="fine-tune from a run directory, or a Hugging Face directory (config.json "
                          "+ model.safetensors + tokenizer.json): clm from gpt2/llama/mistral/qwen2, "
                          "mlm or classify from bert / sentence-transformers (default: from scratch)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out-dir (also automatic when it holds checkpoints)")
    run.add_argument("--overwrite", action="store_true",
                     help="discard an existing run in --out-dir instead of resuming it")
    run.add_argument("--seed", type=int, default=0, help="fixes initialisation, dropout and the batch order")
    run.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                     help="compile afresh instead of using JAX's persistent compilation cache "
                          "(~/.cache/transformer_jax/jax_compilation_cache)")
    run.add_argument("--no-reuse-host-memory", dest="reuse_host_memory", action="store_const", const=False,
                     default=None,
                     help="CPU: let malloc return each step's freed temp memory to the OS (default: "
                          "model training keeps it for the next step where a step's temp buffer is "
                          "over 32 MiB, steps ~20%% cheaper, one step in flight; word vectors do not)")
    run.add_argument("--reuse-host-memory", dest="reuse_host_memory", action="store_const", const=True,
                     help="keep it whatever the step's size, and say so where it cannot apply (word "
                          "vectors too)")
    run.add_argument("--onednn", action="store_true",
                     help="CPU: the steps' matrix products through oneDNN, an experimental XLA option, "
                          "~10%% cheaper steps (default: off, XLA's own kernels)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=positive_int, default=None,
                     help="default: 1000 on CPU, 5000 on accelerators; a larger value extends a finished run")
    opt.add_argument("--batch-size", type=positive_int, default=None,
                     help="global batch in sequences (default: 16 on CPU, 64 on accelerators)")
    opt.add_argument("--seq-len", type=positive_int, default=None,
                     help="default: 64 on CPU, 256 on accelerators, at most the preset's max_len")
    opt.add_argument("--accum-steps", type=positive_int, default=1,
                     help="split each batch into this many sequential micro-batches")
    opt.add_argument("--lr", type=positive_float, default=None,
                     help="peak learning rate (default: 2e-3 on CPU, 1e-3 on accelerators; "
                          "a tenth of that with --init-from; word vectors: 0.05, for cbow and "
                          "skipgram times sqrt(batch/1024) above 1,024 centres per step)")
    opt.add_argument("--warmup-steps", type=nonneg_int, default=None,
                     help="linear warmup (default: 5%% of --decay-steps, at most 200)")
    opt.add_argument("--decay-steps", type=positive_int, default=None,
                     help="cosine decay horizon (default: --max-steps)")
    opt.add_argument("--weight-decay", type=nonneg_float, default=0.1,
                     help="AdamW weight decay of weight matrices (not biases, norms, embeddings)")
    opt.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="0 disables clipping")
    opt.add_argument("--label-smoothing", type=fraction, default=None, help="default: 0.1 for seq2seq, else 0")
    opt.add_argument("--pooling", choices=("mean", "first"), default="first",
                     help="classify: how token states become one sentence vector (first: the "
                          "first real token's state; on the built-in task it learned where mean "
                          "pooling did not within 1000 steps)")
    opt.add_argument("--freeze", default=None, metavar="REGEX",
                     help="freeze parameters whose path (e.g. blocks/layer_0/mlp/wi/kernel) matches "
                          "the regex (re.search), e.g. '^encoder/' to train only a classifier head; "
                          "layers of a scanned stack match as .../layer_<i>/... too "
                          "(default: train every parameter)")
    opt.add_argument("--skip-nonfinite", action="store_true",
                     help="skip steps with a non-finite loss or gradient instead of stopping")
    opt.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    opt.add_argument("--dropout", type=fraction, default=None,
                     help="dropout rate (default: the preset's; 0 for the small CPU model)")
    log = p.add_argument_group("evaluation, logging, checkpoints")
    log.add_argument("--eval-every", type=positive_int, default=None,
                     help="steps between validations (default: 250, and the last step)")
    log.add_argument("--eval-batches", type=positive_int, default=None,
                     help="fixed validation batches (default: 8 on CPU, 20 on accelerators)")
    log.add_argument("--log-every", type=positive_int, default=None,
                     help="steps between metrics.jsonl records (default: 20 on CPU, 10 on accelerators)")
    log.add_argument("--checkpoint-every", type=positive_int, default=None,
                     help="steps between checkpoints (default: 1000, and the last step)")
    log.add_argument("--keep-checkpoints", type=positive_int, default=3,
                     help="keep this many newest checkpoints, plus the best by val loss")
    log.add_argument("--sample-tokens", type=nonneg_int, default=300,
                     help="tokens of the final clm sample; 0 skips the final sample of any objective")
    dist = p.add_argument_group("devices")
    dist.add_argument("--mesh", default=None,
                      help="device mesh, e.g. 'data=-1' or 'data=2,fsdp=2,tensor=2', or 'none' for "
                           "one device (default: every device on 'data' when there are several)")
    dist.add_argument("--coordinator-address", default=None,
                      help="multi-process runs: host:port of process 0 (default: from the launcher's environment)")
    dist.add_argument("--distributed-timeout", dest="distributed_timeout_s", type=positive_float,
                      default=300.0, help="multi-process runs: seconds to wait for every process "
                                          "to join before exiting with an error")
    dist.add_argument("--num-processes", type=positive_int, default=None,
                      help="multi-process runs (default: from the launcher's environment, else 1)")
    dist.add_argument("--process-id", type=nonneg_int, default=None,
                      help="multi-process runs (default: from the launcher's environment, else 0)")
    word_vectors_cli.add_arguments(p, positive_int, nonneg_float, positive_float)
    model = p.add_argument_group("model (override any preset field)")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _MODEL_FLAG_SKIP:
            help = ("default: the tokenizer's vocabulary; --tokenizer bpe builds one of this size, "
                    "else 4096" if f.name == "vocab_size"
                    else "default: the preset's, or the --init-from run's")
            model.add_argument("--" + f.name.replace("_", "-"), dest="model_" + f.name, help=help,
                               type=field_parser(f.type), default=None, metavar=f.type.split(" |")[0].upper())
    return p


def config_from_args(args: argparse.Namespace):
    """The TrainConfig that `build_parser`'s `args` describe."""
    from transformer_jax.train_config import TrainConfig

    values = vars(args)
    model = {k[len("model_"):]: v for k, v in values.items() if k.startswith("model_") and v is not None}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return TrainConfig(model=model, **{k: v for k, v in values.items() if k in fields})


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from transformer_jax.run import train
    from transformer_jax.word_vectors import cli as word_vectors_cli

    if args.objective in word_vectors_cli.OBJECTIVES:
        return word_vectors_cli.run(args, parser)
    words_only = word_vectors_cli.set_flags(args, parser, word_vectors_cli.WORD_ONLY_FLAGS)
    if words_only:
        raise ValueError(f"{', '.join(words_only)}: only for the word-vector objectives (cbow, skipgram, glove)")
    train(config_from_args(args))
    return 0


# ------------------------------------------------------------------------ sample


def sample_parser() -> argparse.ArgumentParser:
    """The flags of `train.py sample`."""
    from transformer_jax.train_config import TrainConfig, default_out_dir

    p = argparse.ArgumentParser(prog="train.py sample", formatter_class=HelpFormatter,
                                description="Generate text from a trained clm run or a Hugging Face "
                                            "causal LM directory, or translate with a Hugging Face "
                                            "Marian directory.")
    p.add_argument("--out-dir", default=default_out_dir(TrainConfig()), help="the run (unless --model)")
    p.add_argument("--model", default=None,
                   help="a run directory or a Hugging Face directory (gpt2, llama, mistral, qwen2, or marian, "
                        "which translates the prompt: config.json, model.safetensors, tokenizer.json); "
                        "default: the run in --out-dir")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="sample",
                   help="decoding strategy")
    p.add_argument("--temperature", type=positive_float, default=0.8,
                   help="sample: < 1 sharpens the distribution, > 1 flattens it")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample: draw from the k most likely tokens only (default: all tokens)")
    p.add_argument("--top-p", type=positive_float, default=None,
                   help="sample: draw from the most likely tokens whose probability reaches p "
                        "(default: all tokens)")
    p.add_argument("--num-beams", type=positive_int, default=4, help="beam: hypotheses kept")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    return p


def run_sample(args: argparse.Namespace) -> int:
    """`train.py sample`: the prompt, then what the run's best (else latest) checkpoint
    writes after it, in sliding windows beyond the model's context. A translation model
    (a Hugging Face Marian directory) prints its translation of the prompt instead."""
    from transformer_jax.generation import generate_text
    from transformer_jax.run.source import load_generator

    model, params, tokenizer, options = load_generator(args.model or args.out_dir)
    decoding = dict(strategy=args.strategy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    num_beams=args.num_beams)
    if options:  # an encoder-decoder: the prompt is the source, encoded as the model saw its sources
        from transformer_jax import generate

        source = tokenizer.encode_batch([args.prompt])[0]
        out = generate(model, params, [source.tolist()], max_new_tokens=args.max_new_tokens, rng=args.seed,
                       **decoding, **options)
        print(tokenizer.decode(out.tokens[0, : int(out.lengths[0])]))
        return 0
    print(args.prompt + generate_text(model, params, tokenizer, args.prompt, args.max_new_tokens,
                                      seed=args.seed, **decoding))
    return 0


def search_command(name: str) -> tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]:
    """`train.py embed|search`: transformer_jax.search's command line, under train.py's name."""
    def parser() -> argparse.ArgumentParser:
        from transformer_jax.search import cli

        add_arguments, _, description = cli.COMMANDS[name]
        p = argparse.ArgumentParser(prog=f"train.py {name}", description=description)
        add_arguments(p)
        return p

    def runner(args: argparse.Namespace) -> int:
        from transformer_jax.search import cli

        return cli.COMMANDS[name][1](args)

    return parser, runner


SUBCOMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "sample": (sample_parser, run_sample),
    "embed": search_command("embed"),    # build a vector index of a file or folder of texts
    "search": search_command("search"),  # query it
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: `train.py [flags]` trains, `train.py <subcommand> [flags]` runs one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        parser, runner = SUBCOMMANDS[argv[0]]
        return runner(parser().parse_args(argv[1:]))
    parser = build_parser()
    return run_train(parser.parse_args(argv), parser)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, TypeError, FloatingPointError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # run_dir.DiskFullError names the directory; any other full disk too
        from transformer_jax.run_dir import DiskFullError, is_disk_full
        if not is_disk_full(e):
            raise
        print(f"train.py: error: {e if isinstance(e, DiskFullError) else f'disk full: {e}'}",
              file=sys.stderr)
        sys.exit(1)
