"""Train a transformer_jax model end to end, or sample from a trained run.

    python train.py                          # char-level GPT on the Python stdlib (CPU: ~3 min)
    python train.py --data shakespeare --max-steps 5000
    python train.py --objective mlm --out-dir runs/mlm
    python train.py --objective classify --init-from runs/mlm --freeze '^encoder/'
    python train.py sample --out-dir runs/clm --prompt "def main("

Re-running a command on an existing --out-dir resumes it exactly. Everything reusable
lives in the package (`transformer_jax.tasks` for what each objective needs,
`.run_log`, `.training`, `.checkpoint`, `.sharding`, ...); this file parses flags,
manages the run directory, wires the pieces together and runs the loop.
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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from transformer_jax.tasks import Task

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


def _help_with_default(action: argparse.Action) -> str:
    """A flag's help text with "(default: %(default)s)" appended, unless the text states the
    default itself (one that depends on the device or on other flags) or the flag takes no
    value (--resume, --help)."""
    text = action.help or ""
    if action.nargs == 0 or "default" in text:
        return text
    return f"{text} (default: %(default)s)".lstrip()


class _HelpFormatter(argparse.HelpFormatter):
    """States every flag's default once (see `_help_with_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return _help_with_default(action)


def build_parser() -> argparse.ArgumentParser:
    """The training CLI. Defaults of None are filled in by `_resolve_defaults`."""
    from transformer_jax.config import ModelConfig, list_presets
    from transformer_jax.tasks import OBJECTIVES

    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=list_presets(), default=None,
                     help="model preset (default: a small char model on CPU, char-small on accelerators)")
    run.add_argument("--objective", choices=OBJECTIVES, default="clm",
                     help="causal LM (DecoderLM), masked LM (MaskedLM), translation "
                          "(EncoderDecoder) or classification (SequenceClassifier)")
    run.add_argument("--data", default=None,
                     help="'stdlib', 'shakespeare', a text file/folder, or a TSV file (seq2seq, "
                          "classify); default: stdlib, or a synthetic task for seq2seq/classify")
    run.add_argument("--tokenizer", default="char", help="char | byte | bpe | path to tokenizer.json")
    run.add_argument("--out-dir", default=None, help="run directory (default: runs/<objective>)")
    run.add_argument("--init-from", default=None,
                     help="fine-tune from another run's directory (default: train from scratch)")
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
    opt.add_argument("--dropout", type=_fraction, default=None,
                     help="dropout rate (default: the preset's; 0 for the small CPU model)")
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
                      help="device mesh, e.g. 'data=-1' or 'data=2,fsdp=2,tensor=2', or 'none' for "
                           "one device (default: every device on 'data' when there are several)")
    dist.add_argument("--coordinator-address", default=None,
                      help="multi-process runs: host:port of process 0 (default: from the launcher's "
                           "environment)")
    dist.add_argument("--num-processes", type=_positive_int, default=None,
                      help="multi-process runs (default: from the launcher's environment, else 1)")
    dist.add_argument("--process-id", type=_nonneg_int, default=None,
                      help="multi-process runs (default: from the launcher's environment, else 0)")
    model = p.add_argument_group("model (override any preset field)")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _MODEL_FLAG_SKIP:
            help = ("default: the tokenizer's vocabulary; --tokenizer bpe builds one of this size, "
                    "else 4096" if f.name == "vocab_size"
                    else "default: the preset's, or the --init-from run's")
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


# ---------------------------------------------------------------------- run files


def _run_config(args, cfg, task: Task) -> dict:
    """What config.json records: the model, the training flags, the task's facts."""
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


def _agree_on_out_dir(out_dir: str, config: dict, *, overwrite: bool, resume: bool) -> bool:
    """`_check_out_dir` decided on process 0 alone and broadcast to every process, so that
    all agree although process 0 may be rewriting a shared `out_dir` meanwhile.

    The broadcast is a collective, so it also keeps process 0 from writing before every
    process has read what it needs from the directory (a resumed run's tokenizer).
    Process 0 re-raises its ValueError after the broadcast; the others raise one too.
    """
    import jax

    decision, error = 0, None  # 1: resume, 0: start fresh, -1: invalid
    if jax.process_index() == 0:
        try:
            decision = int(_check_out_dir(out_dir, config, overwrite=overwrite, resume=resume))
        except ValueError as e:
            decision, error = -1, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        decision = int(multihost_utils.broadcast_one_to_all(np.int32(decision)))
    if error is not None:
        raise error
    if decision < 0:
        raise ValueError(f"--out-dir {out_dir!r} was rejected by process 0 (see its error)")
    return decision == 1


def _make_mesh(spec: str | None) -> Mesh | None:
    """The device mesh of --mesh: a spec for `sharding.make_mesh`; "none" for one device
    (no mesh; single-process runs only); None (the default) puts every device on "data"
    when there are several, and is one device otherwise."""
    import jax

    from transformer_jax import sharding

    if spec is None:
        return sharding.make_mesh(None) if jax.device_count() > 1 else None
    if spec.strip().lower() == "none":
        if jax.process_count() > 1:
            raise ValueError("--mesh none: a multi-process run needs a mesh over every process's devices")
        return None
    return sharding.make_mesh(spec)


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
    """Train as `build_parser`'s `args` say: validate everything, then start, resume or
    overwrite the run in --out-dir and train to --max-steps (or a SIGTERM/SIGINT, after
    which the step is finished and saved). Returns the exit status, 0.

    Raises ValueError for invalid flags, data or run directories (before writing
    anything), FloatingPointError for a non-finite step without --skip-nonfinite.
    """
    import jax

    from transformer_jax import checkpoint, sharding

    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    _resolve_defaults(args, accelerator=jax.default_backend() != "cpu")
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    task, cfg, tokenizer = _build_task(args)
    config = _run_config(args, cfg, task)
    resuming = _agree_on_out_dir(args.out_dir, config, overwrite=args.overwrite, resume=args.resume)
    run = _compile_run(args, task)
    if is_main and not resuming:  # only once every flag has been validated
        _start_fresh(args.out_dir, config, tokenizer)
    if jax.process_count() > 1:  # no process reads the directory before process 0 has written it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("train.py: out-dir ready")

    ckpt = checkpoint.Checkpointer(os.path.join(args.out_dir, "checkpoints"),
                                   max_to_keep=args.keep_checkpoints)
    mesh_ctx = sharding.use_mesh(run.mesh) if run.mesh is not None else contextlib.nullcontext()
    with mesh_ctx, ckpt, _StopSignal() as stop:
        state = ckpt.restore(checkpoint.abstract_state(run.abstract, run.state_sharding)) if resuming else None
        if state is None:
            state = jax.jit(run.init_fn, **run.jit_state)()
            if args.init_from:
                state = state.replace(params=_load_init_params(args.init_from, state.params, say))
        start = int(state.step)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract.params))
        say(f"{args.objective}: {n_params / 1e6:.2f}M params ({cfg.d_model}d x {cfg.num_layers}L, "
            f"{cfg.dtype}), vocab {cfg.vocab_size}, batch {args.batch_size} x {args.seq_len}, "
            f"{args.max_steps} steps on {run.num_devices} {jax.default_backend()} device(s)"
            + (f"; resuming at step {start}" if start else ""))
        if task.baseline is not None:
            say(f"unigram entropy of the training tokens: {task.baseline:.3f} nats")
        state = _train_loop(args, task, cfg, run, state, ckpt, stop, say, is_main)
        # (multi-process: params span hosts, and generation here is single-process)
        if not stop.received and jax.process_count() == 1 and args.sample_tokens:
            text = task.show(state.params)
            with open(os.path.join(args.out_dir, "sample.txt"), "w") as f:
                f.write(text + "\n")
            say(("sample:\n" if args.objective in ("clm", "seq2seq") else "") + text)
    return 0


def _build_task(args: argparse.Namespace):
    """(task, model config, tokenizer) for the flags, with the data checked before anything compiles.

    --init-from fixes the architecture and tokenizer to the source run's; an existing run
    in --out-dir (resumed) keeps its own tokenizer.
    """
    from transformer_jax import tokenizers
    from transformer_jax.config import ModelConfig, get_config
    from transformer_jax.tasks import build_task, check_batch

    tokenizer, base_cfg = None, None
    if args.init_from:
        with open(os.path.join(args.init_from, "config.json")) as f:
            base_cfg = ModelConfig.from_dict(json.load(f)["model"])
        tokenizer = tokenizers.load_tokenizer(args.init_from)
    if os.path.exists(os.path.join(args.out_dir, "config.json")) and not args.overwrite:
        tokenizer = tokenizers.load_tokenizer(args.out_dir)

    def cfg_fn(vocab_size: int) -> ModelConfig:
        overrides = {name[len("model_"):]: v for name, v in vars(args).items()
                     if name.startswith("model_") and v is not None}
        overrides.update(vocab_size=vocab_size, dtype=args.dtype)
        if args.dropout is not None:
            overrides["dropout_rate"] = args.dropout
        if base_cfg is not None:
            return dataclasses.replace(base_cfg, **overrides)
        return get_config(args.preset, **overrides)

    task, cfg, tokenizer = build_task(
        args.objective, cfg_fn, data_spec=args.data, tokenizer=tokenizer,
        tokenizer_kind=args.tokenizer, vocab_size=args.model_vocab_size or 4096,
        batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
        eval_batches=args.eval_batches, pooling=args.pooling, sample_tokens=args.sample_tokens)
    if args.objective in ("clm", "mlm") and args.seq_len > cfg.max_len and cfg.pos_encoding == "learned":
        raise ValueError(f"--seq-len={args.seq_len} exceeds the model's max_len={cfg.max_len}: "
                         f"pass --max-len {args.seq_len} or a shorter --seq-len")
    for batch in (task.train_batch(0), *task.val_batches):
        check_batch(batch, cfg)
    return task, cfg, tokenizer


@dataclasses.dataclass(frozen=True)
class _Run:
    """The optimiser, the jitted steps and where arrays live, for one run."""

    schedule: Callable[[int], Any]
    init_fn: Callable[[], Any]  # -> a fresh TrainState
    abstract: Any  # the TrainState's shapes
    mesh: Mesh | None
    state_sharding: Any  # None without a mesh
    jit_state: dict  # jax.jit kwargs placing a fresh state on the mesh
    put: Callable[[dict], Any]  # host batch -> device (global) batch
    train_step: Callable
    eval_step: Callable

    @property
    def num_devices(self) -> int:
        return self.mesh.size if self.mesh is not None else 1


def _compile_run(args: argparse.Namespace, task: Task) -> _Run:
    """Optimiser, state initialiser and jitted train/eval steps (sharded over --mesh if any)."""
    import jax

    from transformer_jax import sharding, training

    schedule = training.make_schedule(args.lr, warmup_steps=args.warmup_steps, total_steps=args.decay_steps)
    tx = training.make_optimizer(schedule, weight_decay=args.weight_decay,
                                 grad_clip=args.grad_clip or None, freeze=args.freeze)
    init_fn = functools.partial(training.init_train_state, task.model, tx, task.init_args,
                                seed=args.seed, init_kwargs=task.init_kwargs)
    abstract = jax.eval_shape(init_fn)
    if args.freeze:
        frozen = [np.broadcast_to(m, x.shape) for m, x in zip(
            jax.tree.leaves(training.frozen_layers(abstract.params, args.freeze)), jax.tree.leaves(abstract.params))]
        if not any(m.any() for m in frozen) or all(m.all() for m in frozen):
            paths = [training.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract.params)]
            raise ValueError(f"--freeze={args.freeze!r} matches {'no' if not any(m.any() for m in frozen) else 'every'}"
                             f" parameter; paths look like {paths[:4]}")
    mesh = _make_mesh(args.mesh)
    if mesh is not None:
        split = mesh.shape["data"] * mesh.shape["fsdp"]
        if args.batch_size % split:
            raise ValueError(f"--batch-size={args.batch_size} does not split over the data*fsdp={split} "
                             f"devices of the mesh {dict(mesh.shape)}: pass another --batch-size or --mesh")
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
    train_step = jax.jit(training.make_train_step(loss_fn, tx, accum_steps=args.accum_steps),
                         donate_argnums=0, **jit_step)
    eval_step = jax.jit(training.make_loss_fn(task.model, args.objective), **jit_eval)
    return _Run(schedule, init_fn, abstract, mesh, state_sh, jit_state, put, train_step, eval_step)


def _train_loop(args, task: Task, cfg, run: _Run, state, ckpt, stop: _StopSignal, say, is_main: bool):
    """Steps from state.step to --max-steps (or a stop signal); logs, evaluates, checkpoints.

    Host-side checks run one step behind the device (the next step is already queued when
    a step's metrics are read). tokens/s leaves out the first step of the process, which
    compiles, and evaluation time; that first step's wall time is logged as first_step_sec.
    """
    import jax

    from transformer_jax import training
    from transformer_jax.run_log import RunLog

    start = int(state.step)
    log = RunLog(args.out_dir, start, enabled=is_main)
    peak = training.peak_flops(jax.devices()[0])
    flops_tok = _flops_per_token(cfg, args) if peak else None
    bar = _progress(args.max_steps, start, enabled=is_main and sys.stderr.isatty())
    guard = _FiniteGuard(args.skip_nonfinite, ckpt, say)
    t_start = time.perf_counter()
    t_log, step_log, first_step_sec, pending, first_record = t_start, start, None, None, True

    def evaluate(params) -> float:
        sums = [run.eval_step(params, run.put(b)) for b in task.val_batches]
        total, weight = np.sum(jax.device_get(sums), axis=0)
        return float(total / max(weight, 1.0))

    try:
        for step in range(start, args.max_steps):
            state, metrics = run.train_step(state, run.put(task.train_batch(step)))
            done = step + 1
            if first_step_sec is None:  # compiled and ran: start the tokens/s clock here
                jax.block_until_ready(metrics)
                t_log = time.perf_counter()
                first_step_sec, step_log = t_log - t_start, done
            if pending is not None:  # one step behind, so the device stays busy
                guard.check(*pending)
            pending = (done, metrics)
            last = done == args.max_steps or stop.received
            if not (last or done % args.log_every == 0 or done % args.eval_every == 0
                    or done % args.checkpoint_every == 0):
                bar.update(1)
                continue
            m = guard.check(*pending)
            pending = None
            now = time.perf_counter()
            # Only the compiling first step so far: its own rate, compilation included.
            steps, seconds = (done - step_log, now - t_log) if done > step_log else (1, first_step_sec)
            rate = steps * task.tokens_per_batch / seconds
            t_log, step_log = now, done
            record = {"step": done, "train_loss": float(m["loss"]), "lr": float(run.schedule(step)),
                      "tokens_per_sec": rate, "grad_norm": float(m["grad_norm"]),
                      "elapsed_sec": now - t_start}
            if first_record:
                record["first_step_sec"], first_record = first_step_sec, False
            if peak and flops_tok:
                record["mfu"] = rate * flops_tok / (peak * run.num_devices)
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
            guard.check(*pending)
    finally:
        bar.close()
        ckpt.wait()
        log.close()
    if guard.skipped:
        say(f"{guard.skipped} step(s) skipped for non-finite values")
    return state


class _FiniteGuard:
    """Reads a step's metrics and stops the run on a non-finite loss or gradient
    (or counts the skipped update, with --skip-nonfinite)."""

    def __init__(self, skip: bool, ckpt, say):
        self.skip, self.ckpt, self.say, self.skipped = skip, ckpt, say, 0

    def check(self, done: int, metrics) -> dict:
        import jax

        m = jax.device_get(metrics)
        if not m["finite"]:
            if not self.skip:
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {done} (loss {m['loss']}, grad norm "
                    f"{m['grad_norm']}); stopping without saving (latest checkpoint: step "
                    f"{self.ckpt.latest_step()}). Pass --skip-nonfinite to skip such steps.")
            self.skipped += 1
            self.say(f"step {done}: non-finite loss or gradient, update skipped")
        return m


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


def sample_parser() -> argparse.ArgumentParser:
    """The flags of `train.py sample`."""
    p = argparse.ArgumentParser(prog="train.py sample", formatter_class=_HelpFormatter,
                                description="Generate text from a trained clm run.")
    p.add_argument("--out-dir", default=os.path.join("runs", "clm"), help="the run")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="sample",
                   help="decoding strategy")
    p.add_argument("--temperature", type=_positive_float, default=0.8,
                   help="sample: < 1 sharpens the distribution, > 1 flattens it")
    p.add_argument("--top-k", type=_positive_int, default=None,
                   help="sample: draw from the k most likely tokens only (default: all tokens)")
    p.add_argument("--top-p", type=_positive_float, default=None,
                   help="sample: draw from the most likely tokens whose probability reaches p "
                        "(default: all tokens)")
    p.add_argument("--num-beams", type=_positive_int, default=4, help="beam: hypotheses kept")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    return p


def sample(argv: list[str]) -> int:
    """`train.py sample`: generate from a run's best (else latest) checkpoint."""
    import jax

    from transformer_jax import checkpoint, models, tokenizers
    from transformer_jax.config import ModelConfig
    from transformer_jax.tasks import clm_sample

    p = sample_parser()
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
    print(clm_sample(models.DecoderLM(cfg), params, tokenizer, args.prompt, args.max_new_tokens,
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
