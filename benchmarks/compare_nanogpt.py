"""A training step of ours against nanoGPT's (PyTorch eager), side by side on one CPU core.

    python benchmarks/compare_nanogpt.py --nanogpt PATH/TO/nanoGPT [--config small|char-small]
        [--text FILE] [--steps 300] [--timed-steps 30] [--core 1]

nanoGPT is not vendored: pass the folder of a checkout of karpathy/nanoGPT (its model.py is
imported from there). Needs torch beside jax in this Python (a benchmark peer, never a test one).

Both sides get the same character-level text (90% train, 10% validation), the same model
(GPT-2 layout: learned positions, pre-LayerNorm, tied read-out, biases, no dropout), the same
AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1, clip 1.0, constant lr after 10 linear warmup
steps) and float32. Two differences are each library's own habit, kept by default: nanoGPT's GELU is
the exact erf form (ours the tanh form) and it decays the embeddings too (ours: matrices only);
--same-model removes both (ours then trains with activation "gelu_exact" and decays every
parameter of two or more dimensions, nanoGPT's rule), so the two sides train the same model and
differ only in initial values and float rounding. --malloc-hugepages starts both children with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35: malloc's large blocks on transparent huge
pages): an environment setting, not a default of either library, off by default. It matters to
ours because XLA's CPU runtime takes each step's temp buffer (0.2 GB at `small`, 3.5 GB at
`char-small`) from malloc and frees it after the step, so every 4 KiB page of it faults again on
every step (see benchmarks/RESULTS.md, "Fourth round"); torch's step does not.
Ours is built as train.py builds it: malloc keeps each step's freed temp memory for the next
step (train.py's default; --no-reuse-host-memory gives ours malloc's defaults, as train.py's
flag of that name; see run/host_memory.py). --onednn runs the matrix products through
oneDNN, as train.py's opt-in flag of that name (run/compiler_options.py).
Each side runs in its own child process pinned to the
same core (taskset) with one thread, so the comparison is CPU seconds per step: the median of
--timed-steps steps after warm-up (ours excludes compilation), measured with the process's
CPU clock. The two children run at once and take turns over the timed steps (one step of
ours, one of nanoGPT's, ..., handing a token through two pipes), so a change in the machine's
load during the run (a shared VM's neighbours) falls on both sides alike; the ratio is the
median of the per-pair ratios. (Warm-up is not synchronised: ours compiles while nanoGPT warms
up, so "first step" is wall time shared with the other side.) Both then train to --steps and
report the validation loss on the same 20 fixed validation windows. Prints both rows and the
ratio; writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIGS = {
    # the configuration, and nanoGPT's shakespeare-char model (char-small)
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32),
    "char-small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64),
}
LR, WARMUP, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 10, 0.1, (0.9, 0.95), 1.0
EVAL_WINDOWS = 20


def load_data(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Character ids of the text (sorted alphabet), split 90/10."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    alphabet = sorted(set(text))
    lookup = {c: i for i, c in enumerate(alphabet)}
    ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(alphabet)


def windows(data: np.ndarray, starts: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    idx = starts[:, None] + np.arange(block + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def batch_starts(rng: np.random.Generator, data: np.ndarray, cfg: dict) -> np.ndarray:
    return rng.integers(0, len(data) - cfg["block_size"] - 1, size=cfg["batch_size"])


def eval_starts(val: np.ndarray, cfg: dict) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, len(val) - cfg["block_size"] - 1,
                                                size=(EVAL_WINDOWS, cfg["batch_size"]))


def lr_at(step: int) -> float:
    return LR * min(1.0, (step + 1) / WARMUP)


# ----------------------------------------------------------------------------- our side
def run_ours(args, cfg: dict) -> dict:
    from transformer_jax.run.host_memory import reuse_freed_host_memory

    # as train.py (default on): before JAX starts its backends
    reused = args.reuse_host_memory and reuse_freed_host_memory()
    import jax
    import jax.numpy as jnp
    import optax

    from transformer_jax import config as config_lib
    from transformer_jax import models, training
    from transformer_jax.run.compiler_options import step_compiler_options

    train, val, vocab = load_data(args.text)
    model_cfg = config_lib.ModelConfig(
        vocab_size=vocab, max_len=cfg["block_size"], d_model=cfg["n_embd"], num_heads=cfg["n_head"],
        num_layers=cfg["n_layer"], d_ff=4 * cfg["n_embd"], activation="gelu_exact" if args.same_model else "gelu",
        norm="layernorm",
        norm_position="pre", pos_encoding="learned", dtype="float32",
        fused_qkv=True,  # the presets' (and train.py's) layout, and nanoGPT's c_attn
        attention_impl=args.attention_impl)
    model = models.DecoderLM(model_cfg)
    schedule = optax.linear_schedule(LR / WARMUP, LR, WARMUP - 1)
    if args.same_model:  # nanoGPT's decay rule: its 2-D tensors, i.e. the weights and embeddings
        # (our biases of the head-shaped projections have 2 or 3 axes but are 1-D in nanoGPT)
        decayed = lambda path, p: p.ndim >= 2 and "bias" not in jax.tree_util.keystr(path)  # noqa: E731
        tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(
            schedule, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY,
            mask=lambda params: jax.tree_util.tree_map_with_path(decayed, params)))
    else:
        tx = training.make_optimizer(schedule, weight_decay=WEIGHT_DECAY, grad_clip=CLIP, b1=BETAS[0], b2=BETAS[1])
    state = training.init_train_state(model, tx, (jnp.zeros((1, cfg["block_size"]), jnp.int32),), seed=0)
    options = step_compiler_options(args.onednn)  # as train.py compiles its steps
    step = jax.jit(training.make_train_step(training.make_loss_fn(model, "clm"), tx), donate_argnums=0,
                   compiler_options=options)
    loss_fn = jax.jit(training.make_loss_fn(model, "clm"), compiler_options=options)
    rng = np.random.default_rng(0)

    def one_step(state):
        x, y = windows(train, batch_starts(rng, train, cfg), cfg["block_size"])
        state, metrics = step(state, {"inputs": x, "targets": y})
        jax.block_until_ready(metrics)
        return state, metrics

    def evaluate(params) -> float:
        sums = [loss_fn(params, dict(zip(("inputs", "targets"), windows(val, s, cfg["block_size"]))))
                for s in eval_starts(val, cfg)]
        return float(sum(total for total, _ in sums) / sum(weight for _, weight in sums))

    return {**run_loop(args, one_step, state, lambda s: evaluate(s.params)), "reuse_host_memory": reused}


# ----------------------------------------------------------------------------- nanoGPT's side
def run_nanogpt(args, cfg: dict) -> dict:
    import torch

    sys.path.insert(0, os.path.abspath(args.nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val, vocab = load_data(args.text)
    model = GPT(GPTConfig(block_size=cfg["block_size"], vocab_size=vocab, n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0, bias=True))
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
    rng = np.random.default_rng(0)

    def one_step(step_index):
        x, y = windows(train, batch_starts(rng, train, cfg), cfg["block_size"])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step_index)
        _, loss = model(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_index + 1, {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(_) -> float:
        model.eval()
        losses = []
        for s in eval_starts(val, cfg):
            x, y = windows(val, s, cfg["block_size"])
            losses.append(float(model(torch.from_numpy(x).long(), torch.from_numpy(y).long())[1]))
        model.train()
        return float(np.mean(losses))

    return run_loop(args, one_step, 0, evaluate)


def run_loop(args, one_step, state, evaluate) -> dict:
    """Warm-up, --timed-steps steps timed one by one (CPU clock), each taken on this side's
    turn, then on to --steps; evaluate."""
    wall = time.perf_counter()
    state, _ = one_step(state)  # ours: compiles here
    first_step_s = time.perf_counter() - wall
    for _ in range(2):
        state, _ = one_step(state)
    cpu_times = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with os.fdopen(args.turn_in, "rb", buffering=0) as turn_in, os.fdopen(args.turn_out, "wb", buffering=0) as turn_out:
        for _ in range(args.timed_steps):
            turn_in.read(1)  # the other side's step is done (or it has finished: end of file)
            start = time.process_time()
            state, metrics = one_step(state)
            cpu_times.append(time.process_time() - start)
            try:
                turn_out.write(b".")
            except BrokenPipeError:  # the other side has finished its timed steps
                pass
    after = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps - 3 - args.timed_steps):
        state, metrics = one_step(state)
    return {"cpu_s_per_step": statistics.median(cpu_times), "cpu_s_steps": cpu_times,
            "first_step_s": round(first_step_s, 2),
            # of the timed steps' CPU time: the kernel's share (page faults), and the faults
            "sys_s_per_step": (after.ru_stime - usage.ru_stime) / args.timed_steps,
            "page_faults_per_step": round((after.ru_minflt - usage.ru_minflt) / args.timed_steps),
            "train_loss": float(metrics["loss"]), "val_loss": evaluate(state), "steps": args.steps}


# ----------------------------------------------------------------------------- parent
def run_sides(args) -> dict:
    """Runs both sides at once, each pinned to --core with one thread, taking turns over
    their timed steps (ours first); returns their JSON results."""
    ours_in, nanogpt_out = os.pipe()
    nanogpt_in, ours_out = os.pipe()
    os.write(nanogpt_out, b".")  # ours takes the first turn
    turns = {"ours": (ours_in, ours_out), "nanogpt": (nanogpt_in, nanogpt_out)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    if args.malloc_hugepages:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    pin = ["taskset", "-c", str(args.core)] if args.core is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        children = {}
        for side, (fd_in, fd_out) in turns.items():
            argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", side,
                    "--result", os.path.join(tmp, side + ".json"), "--turn-fds", f"{fd_in},{fd_out}"]
            children[side] = subprocess.Popen(pin + argv, env=env, pass_fds=(fd_in, fd_out))
        for fd in (ours_in, ours_out, nanogpt_in, nanogpt_out):  # a side that exits ends the other's waits
            os.close(fd)
        failed = [side for side, process in children.items() if process.wait() != 0]
        if failed:
            sys.exit(f"the {' and '.join(failed)} side failed")
        rows = {}
        for side in ("nanogpt", "ours"):
            with open(os.path.join(tmp, side + ".json")) as f:
                rows[side] = json.load(f)
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", required=True, help="folder of a karpathy/nanoGPT checkout (holds model.py)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--text", help="training text (default: the package's stdlib corpus, as train.py uses)")
    parser.add_argument("--steps", type=int, default=300, help="steps before the validation loss")
    parser.add_argument("--timed-steps", type=int, default=30)
    parser.add_argument("--core", type=int, default=1, help="CPU core both sides are pinned to (-1: none)")
    parser.add_argument("--attention-impl", default=None, help="ours: attention implementation (default auto)")
    parser.add_argument("--same-model", action="store_true",
                        help="ours: exact GELU and nanoGPT's weight-decay rule (default: off, each library's habit)")
    parser.add_argument("--malloc-hugepages", action="store_true",
                        help="both sides: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (default: off, the plain environment)")
    parser.add_argument("--onednn", action="store_true",
                        help="ours: as train.py --onednn (default: off, train.py's default)")
    parser.add_argument("--no-reuse-host-memory", dest="reuse_host_memory", action="store_false",
                        help="ours: as train.py --no-reuse-host-memory (default: on, train.py's default)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--side", choices=["ours", "nanogpt"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.core is not None and args.core < 0:
        args.core = None
    if not os.path.isfile(os.path.join(args.nanogpt, "model.py")):
        parser.error(f"--nanogpt={args.nanogpt!r} holds no model.py (expected a nanoGPT checkout)")
    if args.steps < args.timed_steps + 3:
        parser.error(f"--steps={args.steps} must be at least --timed-steps + 3 = {args.timed_steps + 3}")
    cfg = CONFIGS[args.config]
    if args.side:
        args.turn_in, args.turn_out = map(int, args.turn_fds.split(","))
        result = (run_ours if args.side == "ours" else run_nanogpt)(args, cfg)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return
    if args.text is None:
        from transformer_jax import data

        args.text = os.path.join(tempfile.mkdtemp(), "corpus.txt")
        with open(args.text, "w", encoding="utf-8") as f:
            f.write(data.load_text("stdlib"))
        sys.argv += ["--text", args.text]
    rows = run_sides(args)
    # step i of ours ran just before step i of nanoGPT's: the same load on both
    ratio = statistics.median(a / b for a, b in zip(rows["ours"]["cpu_s_steps"], rows["nanogpt"]["cpu_s_steps"]))
    print(f"config {args.config} {cfg}, {args.steps} steps, pinned to core {args.core}, "
          f"same model: {args.same_model}, malloc huge pages: {args.malloc_hugepages}, "
          f"ours reuses host memory: {rows['ours'].get('reuse_host_memory', False)}, "
          f"ours oneDNN: {args.onednn}")
    for side, r in rows.items():
        print(f"{side:>8}: {1e3 * r['cpu_s_per_step']:8.1f} CPU ms/step (system {1e3 * r['sys_s_per_step']:.1f}, "
              f"{r['page_faults_per_step']} page faults)   val loss {r['val_loss']:.4f}   first step {r['first_step_s']} s")
    print(f"ours / nanoGPT CPU seconds per step (median of {args.timed_steps} alternated pairs): {ratio:.2f}x; "
          f"val loss difference "
          f"{rows['ours']['val_loss'] - rows['nanogpt']['val_loss']:+.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "model": cfg, "rows": rows, "ratio": ratio,
                       "same_model": args.same_model, "malloc_hugepages": args.malloc_hugepages,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    if not all(math.isfinite(r["val_loss"]) for r in rows.values()):
        sys.exit("a validation loss is not finite")


if __name__ == "__main__":
    main()
