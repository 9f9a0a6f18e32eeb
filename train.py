"""Train a transformer_jax model end to end, or sample from a trained run.

    python train.py                          # char-level GPT on the Python stdlib (CPU: ~3 min)
    python train.py --data shakespeare --max-steps 5000
    python train.py --objective mlm --out-dir runs/mlm
    python train.py --objective classify --init-from runs/mlm --freeze '^encoder/'
    python train.py sample --out-dir runs/clm --prompt "def main("

Re-running a command on an existing --out-dir resumes it exactly. Everything reusable
lives in the package (`transformer_jax.training`, `.checkpoint`, `.data`, ...); this
file parses flags, wires the pieces together and runs the loop.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np

# ------------------------------------------------------------------------ flags

_MODEL_FLAG_SKIP = ("dtype", "dropout_rate")  # spelled --dtype and --dropout
# Keys of config.json["train"] that may change when a run is resumed.
_RESUMABLE_CHANGES = ("max_steps", "eval_every", "eval_batches", "checkpoint_every",
                      "log_every", "keep_checkpoints", "skip_nonfinite", "sample_tokens")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_parser(type_name: str) -> Callable[[str], Any]:
    """argparse type for a ModelConfig field annotated `type_name` (e.g. 'int | None')."""
    base = {"int": int, "float": float, "bool": _bool, "str": str}[type_name.split(" |")[0]]
    if "None" not in type_name:
        return base
    return lambda text: None if text.lower() == "none" else base(text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None/False ones whose help text explains them."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The training CLI. Defaults of None are filled in by `_resolve_defaults`."""
    from transformer_jax.config import ModelConfig, list_presets

    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=list_presets(), default=None,
                     help="model preset (default: a small char model on CPU, char-small on accelerators)")
    run.add_argument("--objective", choices=("clm", "mlm", "seq2seq", "classify"), default="clm",
                     help="causal LM (DecoderLM), masked LM (MaskedLM), translation "
                          "(EncoderDecoder) or classification (SequenceClassifier)")
    run.add_argument("--data", default=None,
                     help="'stdlib', 'shakespeare', a text file/folder, or a TSV file (seq2seq, "
                          "classify); default: stdlib, or a synthetic task for seq2seq/classify")
    run.add_argument("--tokenizer", default="char", help="char | byte | bpe | path to tokenizer.json")
    run.add_argument("--out-dir", default=None, help="run directory (default: runs/<objective>)")
    run.add_argument("--init-from", default=None, help="fine-tune from another run's directory")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out-dir (also automatic when it holds checkpoints)")
    run.add_argument("--overwrite", action="store_true",
                     help="discard an existing run in --out-dir instead of resuming it")
    run.add_argument("--seed", type=int, default=0,
                     help="fixes initialisation, dropout and the batch order")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=_positive_int, default=None,
                     help="default: 1000 on CPU, 5000 on accelerators")
    opt.add_argument("--batch-size", type=_positive_int, default=None,
                     help="global batch in sequences (default: 16 on CPU, 64 on accelerators)")
    opt.add_argument("--seq-len", type=_positive_int, default=None,
                     help="default: 64 on CPU, 256 on accelerators")
    opt.add_argument("--accum-steps", type=_positive_int, default=1,
                     help="split each batch into this many sequential micro-batches")
    opt.add_argument("--lr", type=_positive_float, default=None,
                     help="peak learning rate (default: 2e-3 on CPU, 1e-3 on accelerators; "
                          "a tenth of that with --init-from)")
    opt.add_argument("--warmup-steps", type=_nonneg_int, default=None,
                     help="linear warmup (default: 5%% of --max-steps, at most 200)")
    opt.add_argument("--decay-steps", type=_positive_int, default=None,
                     help="cosine decay horizon (default: --max-steps)")
    opt.add_argument("--weight-decay", type=_nonneg_float, default=0.1,
                     help="AdamW weight decay of weight matrices (not biases, norms, embeddings)")
    opt.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="0 disables clipping")
    opt.add_argument("--label-smoothing", type=_fraction, default=None,
                     help="default: 0.1 for seq2seq, else 0")
    opt.add_argument("--pooling", choices=("mean", "first"), default="mean",
                     help="classify: how token states become one sentence vector")
    opt.add_argument("--freeze", default=None, metavar="REGEX",
                     help="freeze parameters whose path (e.g. blocks/layer_0/mlp/wi/kernel) matches "
                          "the regex (re.search), e.g. '^encoder/' to train only a classifier head")
    opt.add_argument("--skip-nonfinite", action="store_true",
                     help="skip steps with a non-finite loss or gradient instead of stopping")
    opt.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    opt.add_argument("--dropout", type=_fraction, default=None, help="dropout rate")
    log = p.add_argument_group("evaluation, logging, checkpoints")
    log.add_argument("--eval-every", type=_positive_int, default=None,
                     help="steps between validations (default: 250, and the last step)")
    log.add_argument("--eval-batches", type=_positive_int, default=None,
                     help="fixed validation batches (default: 8 on CPU, 20 on accelerators)")
    log.add_argument("--log-every", type=_positive_int, default=None,
                     help="steps between metrics.jsonl records (default: 20 on CPU, 10 on accelerators)")
    log.add_argument("--checkpoint-every", type=_positive_int, default=None,
                     help="steps between checkpoints (default: 1000, and the last step)")
    log.add_argument("--keep-checkpoints", type=_positive_int, default=3,
                     help="keep this many newest checkpoints, plus the best by val loss")
    log.add_argument("--sample-tokens", type=_nonneg_int, default=300,
                     help="tokens of the final clm sample; 0 skips the final sample of any objective")
    dist = p.add_argument_group("devices")
    dist.add_argument("--mesh", default=None,
                      help="device mesh, e.g. 'data=-1' or 'data=2,fsdp=2,tensor=2' (default: one device)")
    dist.add_argument("--coordinator-address", default=None,
                      help="multi-process runs: host:port of process 0 (else from the launcher's environment)")
    dist.add_argument("--num-processes", type=_positive_int, default=None, help="multi-process runs")
    dist.add_argument("--process-id", type=_nonneg_int, default=None, help="multi-process runs")
    model = p.add_argument_group("model (override any preset field)")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _MODEL_FLAG_SKIP:
            help = ("the model's is the tokenizer's; sets the BPE vocabulary (default 4096)"
                    if f.name == "vocab_size" else None)
            model.add_argument("--" + f.name.replace("_", "-"), dest="model_" + f.name, help=help,
                               type=_field_parser(f.type), default=None, metavar=f.type.split(" |")[0].upper())
    return p


def _resolve_defaults(args: argparse.Namespace, accelerator: bool) -> None:
    """Fill the flags left at None: a ~3 minute run on a CPU, nanoGPT's Shakespeare
    character model on an accelerator."""
    if accelerator:
        preset, batch, seq, steps, lr, every = "char-small", 64, 256, 5000, 1e-3, 250
    else:
        preset, batch, seq, steps, lr, every = None, 16, 64, 1000, 2e-3, 250
    if args.preset is None and args.init_from is None:
        args.preset = preset or "char-small"
        if preset is None:  # char-small shrunk to a few CPU minutes (nanoGPT's "baby GPT")
            for name, value in dict(d_model=128, num_heads=4, num_layers=4, d_ff=512,
                                    max_len=seq).items():
                if getattr(args, "model_" + name) is None:
                    setattr(args, "model_" + name, value)
            if args.dropout is None:
                args.dropout = 0.0
    args.batch_size = args.batch_size or batch
    args.seq_len = args.seq_len or seq
    args.max_steps = args.max_steps or steps
    args.lr = args.lr or (lr if args.init_from is None else lr / 10)
    args.decay_steps = args.decay_steps or args.max_steps
    if args.warmup_steps is None:
        args.warmup_steps = min(200, args.decay_steps // 20)
    args.eval_every = args.eval_every or min(every, args.max_steps)
    args.eval_batches = args.eval_batches or (20 if accelerator else 8)
    args.log_every = args.log_every or min(10 if accelerator else 20, args.max_steps)
    args.checkpoint_every = args.checkpoint_every or min(1000, args.max_steps)
    args.dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    if args.label_smoothing is None:
        args.label_smoothing = 0.1 if args.objective == "seq2seq" else 0.0
    if args.data is None:
        args.data = {"seq2seq": "reverse", "classify": "shuffle"}.get(args.objective, "stdlib")
    args.out_dir = args.out_dir or os.path.join("runs", args.objective)
    if args.batch_size % args.accum_steps:
        raise ValueError(f"--batch-size={args.batch_size} is not divisible by "
                         f"--accum-steps={args.accum_steps}")
    if args.warmup_steps >= args.decay_steps:
        raise ValueError(f"--warmup-steps={args.warmup_steps} must be smaller than "
                         f"--decay-steps={args.decay_steps}")


# ------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
    """One objective's model and data: host batches are dicts of NumPy arrays."""

    model: Any
    init_args: tuple
    train_batch: Callable[[int], dict]  # step -> global batch
    val_batches: list[dict]
    tokens_per_batch: int  # target tokens per global batch, for tokens/s
    baseline: float | None = None  # unigram entropy (nats) of the training tokens
    init_kwargs: dict | None = None  # keyword inputs of model.init besides init_args
    extra: dict = dataclasses.field(default_factory=dict)  # saved in config.json
    show: Callable[[Any], str] | None = None  # params -> the final sample / demonstration


def make_clm_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                   seq_len: int) -> dict:
    """A next-token batch {"inputs", "targets"} int32 [b, seq_len] (module-level so that
    tests can wrap it to inject faults)."""
    from transformer_jax import data

    inputs, targets = data.get_batch(tokens, seed=seed, step=step, batch_size=batch_size,
                                     seq_len=seq_len)
    return {"inputs": inputs, "targets": targets}


def _unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _tokens_and_tokenizer(args, tokenizer):
    """Load the corpus, make (or reuse) the tokenizer, cache the token memmaps."""
    from transformer_jax import data, tokenizers

    text = data.load_text(args.data)
    if tokenizer is None:
        tokenizer = tokenizers.build_tokenizer(args.tokenizer, text,
                                               vocab_size=args.model_vocab_size or 4096)
    cache = os.path.join(os.path.expanduser("~"), ".cache", "transformer_jax", "tokens")
    return data.prepare_tokens(text, tokenizer, cache), tokenizer


def build_task(args, cfg_fn: Callable, tokenizer) -> tuple[Task, Any, Any]:
    """The model, batches and tokenizer for `args.objective`; cfg_fn(vocab_size) -> ModelConfig.

    Raises ValueError for data that cannot make a single batch.
    """
    from transformer_jax import data, models

    b, t, seed = args.batch_size, args.seq_len, args.seed
    if args.objective in ("clm", "mlm"):
        splits, tokenizer = _tokens_and_tokenizer(args, tokenizer)
        data.validate_seq_len(splits.train, t, name="the training split")
        data.validate_seq_len(splits.val, t, name="the validation split")
        cfg = cfg_fn(tokenizer.vocab_size)
        baseline = _unigram_entropy(splits.train, tokenizer.vocab_size)
        if args.objective == "clm":
            make = functools.partial(make_clm_batch, batch_size=b, seq_len=t)
            model = models.DecoderLM(cfg)
        else:
            def make(tokens, *, seed, step):
                ids, labels, weights = data.get_mlm_batch(tokens, seed=seed, step=step, batch_size=b,
                                                          seq_len=t, tokenizer=tokenizer)
                return {"inputs": ids, "targets": labels, "weights": weights}
            model = models.MaskedLM(cfg)
        val = [make(splits.val, seed=seed + 1, step=i) for i in range(args.eval_batches)]
        if args.objective == "clm":
            prompt = tokenizer.decode(np.asarray(splits.val[:32]))
            show = lambda params: _clm_sample(model, params, tokenizer, prompt,  # noqa: E731
                                              args.sample_tokens, seed=seed)
        else:
            show = lambda params: _accuracy(  # noqa: E731
                model, params, val, "inputs", "targets", "masked-token accuracy on the validation batches")
        task = Task(model, (np.zeros((1, t), np.int32),),
                    lambda step: make(splits.train, seed=seed, step=step), val,
                    tokens_per_batch=b * t, baseline=baseline, show=show)
        return task, cfg, tokenizer

    if args.objective == "seq2seq":
        rows = (data.reverse_pairs(2000, seed=seed) if args.data == "reverse"
                else data.read_tsv(args.data))
        if tokenizer is None:
            from transformer_jax import tokenizers
            text = "\n".join(s + "\n" + t_ for s, t_ in rows)
            tokenizer = tokenizers.build_tokenizer(args.tokenizer, text,
                                                   vocab_size=args.model_vocab_size or 4096)
        train_pairs, val_pairs = data.split_examples(data.encode_pairs(rows, tokenizer))
        src_len, tgt_len = data.seq2seq_lengths(train_pairs + val_pairs)
        src_len, tgt_len = min(src_len, t), min(tgt_len, t)
        cfg = cfg_fn(tokenizer.vocab_size)
        ids = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)

        def make(pairs, *, seed, step):
            keys = ("src", "tgt_in", "tgt_out", "src_mask", "tgt_mask")
            return dict(zip(keys, data.make_seq2seq_batch(
                pairs, seed=seed, step=step, batch_size=b, src_len=src_len, tgt_len=tgt_len, **ids)))
        model = models.EncoderDecoder(cfg)
        task = Task(model, (np.zeros((1, src_len), np.int32), np.zeros((1, tgt_len), np.int32)),
                    lambda step: make(train_pairs, seed=seed, step=step),
                    [make(val_pairs, seed=seed + 1, step=i) for i in range(args.eval_batches)],
                    tokens_per_batch=b * tgt_len,
                    show=lambda params: _translate(model, params, tokenizer, val_pairs[:16], tgt_len))
        return task, cfg, tokenizer

    # classify: TSV rows (label<TAB>text) or the synthetic shuffled-window task
    label_names = ["original", "shuffled"]
    if args.data.endswith(".tsv"):
        rows = data.read_tsv(args.data)
        if tokenizer is None:
            from transformer_jax import tokenizers
            tokenizer = tokenizers.build_tokenizer(args.tokenizer, "\n".join(x for _, x in rows),
                                                   vocab_size=args.model_vocab_size or 4096)
        examples, label_names = data.encode_labelled(rows, tokenizer)
    else:
        corpus = "stdlib" if args.data == "shuffle" else args.data
        splits, tokenizer = _tokens_and_tokenizer(argparse.Namespace(**{**vars(args), "data": corpus}),
                                                  tokenizer)
        examples = data.shuffle_examples(splits.train, 4000, seed=seed, seq_len=t)
    train_ex, val_ex = data.split_examples(examples)
    cfg = cfg_fn(tokenizer.vocab_size)

    def make(exs, *, seed, step):
        tokens, mask, labels = data.make_classify_batch(exs, seed=seed, step=step, batch_size=b,
                                                        seq_len=t, pad_id=tokenizer.pad_id)
        return {"tokens": tokens, "padding_mask": mask, "labels": labels}
    model = models.SequenceClassifier(cfg, num_classes=len(label_names), pooling=args.pooling)
    val = [make(val_ex, seed=seed + 1, step=i) for i in range(args.eval_batches)]
    task = Task(model, (np.zeros((1, t), np.int32),),
                lambda step: make(train_ex, seed=seed, step=step), val,
                tokens_per_batch=b * t, init_kwargs={"padding_mask": np.ones((1, t), bool)},
                extra={"label_names": label_names},
                show=lambda params: _accuracy(model, params, val, "tokens", "labels",
                                              "accuracy on the validation batches"))
    return task, cfg, tokenizer


def _accuracy(model, params, batches: list[dict], input_key: str, label_key: str, what: str) -> str:
    """'<what>: 93.1% (of n)', argmax predictions against labels (weighted, if weights exist)."""
    import jax

    @jax.jit
    def counts(params, batch):
        logits = model.apply({"params": params}, batch[input_key],
                             padding_mask=batch.get("padding_mask"))
        weights = batch.get("weights", jax.numpy.ones(batch[label_key].shape))
        return ((logits.argmax(-1) == batch[label_key]) * weights).sum(), weights.sum()

    right, total = np.sum(jax.device_get([counts(params, b) for b in batches]), axis=0)
    return f"{what}: {100 * right / max(total, 1):.1f}% (of {int(total)})"


def _translate(model, params, tokenizer, pairs, max_new_tokens: int) -> str:
    """Greedy translations of `pairs` (source, target ids), one per line, and the exact-match rate."""
    from transformer_jax.generation import generate

    out = generate(model, params, [[int(i) for i in src] for src, _ in pairs],
                   max_new_tokens=max_new_tokens, strategy="greedy", bos_id=tokenizer.bos_id,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    lines, right = [], 0
    for (src, tgt), tokens, n in zip(pairs, np.asarray(out.tokens), np.asarray(out.lengths)):
        pred = [int(i) for i in tokens[:n] if i != tokenizer.eos_id]
        right += pred == [int(i) for i in tgt]
        lines.append(f"{tokenizer.decode(src)!r} -> {tokenizer.decode(pred)!r} "
                     f"(expected {tokenizer.decode(tgt)!r})")
    return "\n".join(lines + [f"exact match: {right}/{len(pairs)}"])


# ---------------------------------------------------------------------- run files


def _run_config(args, cfg, task: Task) -> dict:
    train_keys = ("objective", "data", "tokenizer", "batch_size", "seq_len", "accum_steps", "lr",
                  "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "label_smoothing",
                  "freeze", "pooling", "seed", "init_from", *_RESUMABLE_CHANGES)
    return {"model": cfg.to_dict(), "train": {k: getattr(args, k) for k in train_keys},
            "task": task.extra}


def _check_out_dir(out_dir: str, config: dict, *, overwrite: bool, resume: bool) -> bool:
    """True if `out_dir` holds a compatible run to resume; False for a fresh start (with
    --overwrite, `_start_fresh` clears it later). Raises ValueError for an incompatible
    run, or --resume with nothing to resume."""
    path = os.path.join(out_dir, "config.json")
    if resume and (overwrite or not os.path.exists(path)):
        raise ValueError(f"--resume needs an existing run in {out_dir!r} (and no --overwrite)")
    if overwrite or not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    diffs = [f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}"
             for section in ("model", "train", "task") for k, v in config[section].items()
             if k not in _RESUMABLE_CHANGES and old.get(section, {}).get(k) != v]
    if diffs:
        raise ValueError(
            f"--out-dir {out_dir!r} holds a run with a different configuration ("
            + "; ".join(diffs[:6]) + "): pass --overwrite to replace it, or another --out-dir")
    return True


def _start_fresh(out_dir: str, config: dict, tokenizer) -> None:
    """Empty `out_dir` (an --overwrite'n run), then write config.json and the tokenizer."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            full = os.path.join(out_dir, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save(out_dir)


class RunLog:
    """metrics.jsonl + TensorBoard events + loss.png for one run (written by process 0)."""

    def __init__(self, out_dir: str, start_step: int, enabled: bool):
        self.out_dir, self.enabled = out_dir, enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        # A resumed run rewrites history after its checkpoint: drop later records.
        kept = [r for r in _read_jsonl(self.path) if r["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(out_dir, purge_step=start_step + 1)
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard events", stacklevel=2)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        _plot_losses(_read_jsonl(self.path), os.path.join(self.out_dir, "loss.png"))


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot_losses(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("train_loss", "val_loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key.replace("_", " "), marker="." if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------- train


class _StopSignal:
    """Records SIGTERM/SIGINT so the loop can finish its step, save and exit 0."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def train(args: argparse.Namespace) -> int:
    import jax

    from transformer_jax import checkpoint, sharding, tokenizers, training
    from transformer_jax.config import ModelConfig, get_config

    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    accelerator = jax.default_backend() != "cpu"
    _resolve_defaults(args, accelerator)
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    # The source run of --init-from fixes the architecture and the tokenizer.
    tokenizer, base_cfg = None, None
    if args.init_from:
        with open(os.path.join(args.init_from, "config.json")) as f:
            base_cfg = ModelConfig.from_dict(json.load(f)["model"])
        tokenizer = tokenizers.load_tokenizer(args.init_from)
    if os.path.exists(os.path.join(args.out_dir, "config.json")) and not args.overwrite:
        tokenizer = tokenizers.load_tokenizer(args.out_dir)  # a resumed run keeps its tokenizer

    def cfg_fn(vocab_size: int) -> ModelConfig:
        overrides = {name[len("model_"):]: v for name, v in vars(args).items()
                     if name.startswith("model_") and v is not None}
        overrides.update(vocab_size=vocab_size, dtype=args.dtype)
        if args.dropout is not None:
            overrides["dropout_rate"] = args.dropout
        if base_cfg is not None:
            return dataclasses.replace(base_cfg, **overrides)
        return get_config(args.preset, **overrides)

    task, cfg, tokenizer = build_task(args, cfg_fn, tokenizer)
    if args.objective in ("clm", "mlm") and args.seq_len > cfg.max_len and cfg.pos_encoding == "learned":
        raise ValueError(f"--seq-len={args.seq_len} exceeds the model's max_len={cfg.max_len}: "
                         f"pass --max-len {args.seq_len} or a shorter --seq-len")
    config = _run_config(args, cfg, task)
    resuming = _check_out_dir(args.out_dir, config, overwrite=args.overwrite, resume=args.resume)

    # Optimizer, state and steps.
    schedule = training.make_schedule(args.lr, warmup_steps=args.warmup_steps,
                                      total_steps=args.decay_steps)
    tx = training.make_optimizer(schedule, weight_decay=args.weight_decay,
                                 grad_clip=args.grad_clip or None, freeze=args.freeze)
    init_fn = functools.partial(training.init_train_state, task.model, tx, task.init_args,
                                seed=args.seed, init_kwargs=task.init_kwargs)
    abstract = jax.eval_shape(init_fn)
    if args.freeze:
        labels = jax.tree.leaves(training.param_labels(abstract.params, args.freeze))
        if "frozen" not in labels or "trainable" not in labels:
            paths = [training.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract.params)]
            raise ValueError(f"--freeze={args.freeze!r} matches {'no' if 'frozen' not in labels else 'every'}"
                             f" parameter; paths look like {paths[:4]}")
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        state_sh = sharding.state_shardings(jax.eval_shape(functools.partial(init_fn, unbox=False)), mesh)
        batch_sh = sharding.batch_sharding(mesh)
        rows = sharding.process_batch_slice(mesh, args.batch_size)
        put = lambda batch: sharding.make_global_batch({k: v[rows] for k, v in batch.items()}, mesh)  # noqa: E731
        jit_state = dict(out_shardings=state_sh)
        jit_step = dict(in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
        jit_eval = dict(in_shardings=(state_sh.params, batch_sh))
    else:
        state_sh, put = None, jax.device_put
        jit_state = jit_step = jit_eval = {}
    loss_fn = training.make_loss_fn(task.model, args.objective, label_smoothing=args.label_smoothing)
    eval_loss_fn = training.make_loss_fn(task.model, args.objective)
    train_step = jax.jit(training.make_train_step(loss_fn, tx, accum_steps=args.accum_steps),
                         donate_argnums=0, **jit_step)
    eval_step = jax.jit(eval_loss_fn, **jit_eval)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    if is_main and not resuming:  # only once every flag has been validated
        _start_fresh(args.out_dir, config, tokenizer)

    ckpt = checkpoint.Checkpointer(os.path.join(args.out_dir, "checkpoints"),
                                   max_to_keep=args.keep_checkpoints)
    mesh_ctx = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with mesh_ctx, ckpt, _StopSignal() as stop:
        state = ckpt.restore(checkpoint.abstract_state(abstract, state_sh)) if resuming else None
        if state is None:
            state = jax.jit(init_fn, **jit_state)()
            if args.init_from:
                state = state.replace(params=_load_init_params(args.init_from, state.params, say))
        start = int(state.step)
        say(f"{args.objective}: {n_params / 1e6:.2f}M params ({cfg.d_model}d x {cfg.num_layers}L, "
            f"{cfg.dtype}), vocab {cfg.vocab_size}, batch {args.batch_size} x {args.seq_len}, "
            f"{args.max_steps} steps on {mesh.size if mesh else 1} {jax.default_backend()} device(s)"
            + (f"; resuming at step {start}" if start else ""))
        if task.baseline is not None:
            say(f"unigram entropy of the training tokens: {task.baseline:.3f} nats")

        def evaluate(params) -> float:
            sums = [eval_step(params, put(b)) for b in task.val_batches]
            total, weight = np.sum(jax.device_get(sums), axis=0)
            return float(total / max(weight, 1.0))

        log = RunLog(args.out_dir, start, enabled=is_main)
        peak = training.peak_flops(jax.devices()[0])
        flops_tok = _flops_per_token(cfg, args) if peak else None
        bar = _progress(args.max_steps, start, enabled=is_main and sys.stderr.isatty())
        t_log, step_log, pending, skipped = time.perf_counter(), start, None, 0
        t_start = t_log

        def check(done: int, metrics) -> dict:
            nonlocal skipped
            m = jax.device_get(metrics)
            if not m["finite"]:
                if not args.skip_nonfinite:
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {done} (loss {m['loss']}, grad norm "
                        f"{m['grad_norm']}); stopping without saving (latest checkpoint: step "
                        f"{ckpt.latest_step()}). Pass --skip-nonfinite to skip such steps.")
                skipped += 1
                say(f"step {done}: non-finite loss or gradient, update skipped")
            return m

        try:
            for step in range(start, args.max_steps):
                state, metrics = train_step(state, put(task.train_batch(step)))
                done = step + 1
                if pending is not None:  # one step behind, so the device stays busy
                    check(*pending)
                pending = (done, metrics)
                last = done == args.max_steps or stop.received
                if not (last or done % args.log_every == 0 or done % args.eval_every == 0
                        or done % args.checkpoint_every == 0):
                    bar.update(1)
                    continue
                m = check(*pending)
                pending = None
                now = time.perf_counter()
                rate = (done - step_log) * task.tokens_per_batch / (now - t_log)
                t_log, step_log = now, done
                record = {"step": done, "train_loss": float(m["loss"]), "lr": float(schedule(step)),
                          "tokens_per_sec": rate, "grad_norm": float(m["grad_norm"]),
                          "elapsed_sec": now - t_start}
                if peak and flops_tok:
                    record["mfu"] = rate * flops_tok / (peak * (mesh.size if mesh else 1))
                val_loss = None
                if last or done % args.eval_every == 0:
                    val_loss = evaluate(state.params)
                    record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                    t_log = time.perf_counter()  # keep evaluation out of tokens/s
                log.write(record)
                bar.update(1)
                _report(record, task.baseline, say if not bar.enabled else bar.write)
                if last or done % args.checkpoint_every == 0:
                    ckpt.save(done, state, val_loss=val_loss)
                if stop.received:
                    say(f"{stop.received} received: saved step {done}, exiting")
                    break
            if pending is not None:
                check(*pending)
        finally:
            bar.close()
            ckpt.wait()
            log.close()
        if skipped:
            say(f"{skipped} step(s) skipped for non-finite values")
        # (multi-process: params span hosts, and generation here is single-process)
        if not stop.received and jax.process_count() == 1 and args.sample_tokens:
            text = task.show(state.params)
            with open(os.path.join(args.out_dir, "sample.txt"), "w") as f:
                f.write(text + "\n")
            say(("sample:\n" if args.objective in ("clm", "seq2seq") else "") + text)
    return 0


def _flops_per_token(cfg, args) -> float | None:
    if args.objective != "clm":
        return None  # flops_per_token counts a DecoderLM
    from transformer_jax.config import flops_per_token
    return float(flops_per_token(cfg, args.seq_len))


def _report(record: dict, baseline: float | None, write) -> None:
    parts = [f"step {record['step']}", f"loss {record['train_loss']:.4f}",
             f"lr {record['lr']:.2e}", f"{record['tokens_per_sec']:,.0f} tok/s"]
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})")
        if baseline is not None:
            parts.append(f"= {record['val_loss'] / baseline:.0%} of the unigram entropy")
    write(" | ".join(parts))


class _NoBar:
    enabled = False

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    bar.enabled = True
    return bar


def _load_init_params(run_dir: str, target: Any, say) -> Any:
    """`target` params with every leaf found (same path and shape) in `run_dir`'s best or
    latest checkpoint replaced by the saved value (placed like the target leaf)."""
    import jax

    from transformer_jax import checkpoint, training

    with checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        source = ckpt.restore_params()
    flat = {training.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}
    loaded, fresh = [], []

    def take(path, leaf):
        key = training.param_path(path)
        saved = flat.get(key)
        if saved is None or saved.shape != leaf.shape:
            fresh.append(key)
            return leaf
        loaded.append(key)
        return jax.device_put(np.asarray(saved, leaf.dtype), leaf.sharding)

    params = jax.tree_util.tree_map_with_path(take, target)
    if not loaded:
        raise ValueError(f"--init-from {run_dir!r}: no parameter matches this model "
                         f"(saved paths look like {list(flat)[:4]})")
    say(f"--init-from {run_dir}: loaded {len(loaded)} parameter arrays, "
        f"{len(fresh)} initialised fresh ({', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})")
    return params


# ------------------------------------------------------------------------ sample


def _clm_sample(model, params, tokenizer, prompt: str, max_new_tokens: int, *, seed: int,
                strategy: str = "sample", temperature: float = 0.8, top_k: int | None = None,
                top_p: float | None = None, num_beams: int = 4) -> str:
    """The prompt followed by `max_new_tokens` generated tokens, as text.

    Beyond the model's context (cfg.max_len) generation continues in windows whose
    prompt is the last half-context, so a sample can be longer than the context.
    """
    import jax

    from transformer_jax.generation import generate

    ids = [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise ValueError(f"--prompt={prompt!r} encodes to no tokens")
    keep = model.cfg.max_len // 2
    options = dict(strategy=strategy, num_beams=num_beams)
    if strategy == "sample":
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    key, new = jax.random.PRNGKey(seed), []
    while len(new) < max_new_tokens:
        window = (ids + new)[-keep:]
        key, step_key = jax.random.split(key)
        if strategy == "sample":
            options["rng"] = step_key
        # always the longest continuation that fits, so every window reuses one compilation
        out = generate(model, params, [window], max_new_tokens=model.cfg.max_len - len(window) + 1,
                       **options)
        new += [int(t) for t in np.asarray(out.tokens)[0]]
    return prompt + tokenizer.decode(new[:max_new_tokens])


def sample(argv: list[str]) -> int:
    """`train.py sample`: generate from a run's best (else latest) checkpoint."""
    import jax

    from transformer_jax import checkpoint, models, tokenizers
    from transformer_jax.config import ModelConfig

    p = argparse.ArgumentParser(prog="train.py sample", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Generate text from a trained clm run.")
    p.add_argument("--out-dir", default=os.path.join("runs", "clm"))
    p.add_argument("--prompt", default="\n")
    p.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="sample")
    p.add_argument("--temperature", type=_positive_float, default=0.8)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=_positive_float, default=None)
    p.add_argument("--num-beams", type=_positive_int, default=4)
    p.add_argument("--max-new-tokens", type=_positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = os.path.join(args.out_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"--out-dir {args.out_dir!r} holds no run (no config.json)")
    with open(path) as f:
        config = json.load(f)
    if config["train"]["objective"] != "clm":
        raise ValueError(f"sample needs a clm run; {args.out_dir!r} is {config['train']['objective']!r}")
    cfg = ModelConfig.from_dict(config["model"])
    tokenizer = tokenizers.load_tokenizer(args.out_dir)
    with checkpoint.Checkpointer(os.path.join(args.out_dir, "checkpoints")) as ckpt:
        params = jax.tree.map(jax.numpy.asarray, ckpt.restore_params())
    print(_clm_sample(models.DecoderLM(cfg), params, tokenizer, args.prompt, args.max_new_tokens,
                      seed=args.seed, strategy=args.strategy, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: `train.py [flags]` trains, `train.py sample [flags]` generates."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        return sample(argv[1:])
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, TypeError, FloatingPointError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
