"""CPU milliseconds per training step of ours alone, built as compare_nanogpt.py builds it.

    PYTHONPATH=SOURCE_ROOT python benchmarks/step_cost.py [--config small|char-small]
        [--attention-impl IMPL] [--steps 6] [--hlo FILE]

For A/B runs of two source trees side by side (run it pinned to one core with one thread,
as compare_nanogpt.py does, alternating the trees); nanoGPT is not needed. Random token
batches (vocabulary 96); the median of --steps steps after the compiling one, process CPU
clock (and the minimum, steadier on a loaded machine), with the system (kernel) share of it and
the minor page faults per step (with --no-reuse-host-memory, XLA's CPU runtime takes a fresh
temp buffer from the OS on every call, so each of its pages faults once per step).
--no-reuse-host-memory and --onednn as train.py's flags. --hlo writes the compiled step's HLO
text (fusions, dots) for inspection.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_nanogpt import CONFIGS  # noqa: E402

VOCAB = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--attention-impl", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hlo", help="write the compiled step's HLO text here")
    parser.add_argument("--onednn", action="store_true", help="as train.py --onednn (default: off)")
    parser.add_argument("--no-reuse-host-memory", dest="reuse_host_memory", action="store_false",
                        help="as train.py --no-reuse-host-memory (default: on, as train.py)")
    args = parser.parse_args()

    reused = False
    if args.reuse_host_memory:  # train.py's first step (a tree that has run/host_memory.py)
        try:
            from transformer_jax.run.host_memory import reuse_freed_host_memory
            reused = reuse_freed_host_memory()
        except ImportError:
            pass
    import jax
    import jax.numpy as jnp
    import optax

    import transformer_jax
    from transformer_jax import config as config_lib, models, training

    cfg = CONFIGS[args.config]
    model = models.DecoderLM(config_lib.ModelConfig(
        vocab_size=VOCAB, max_len=cfg["block_size"], d_model=cfg["n_embd"], num_heads=cfg["n_head"],
        num_layers=cfg["n_layer"], d_ff=4 * cfg["n_embd"], activation="gelu", norm="layernorm",
        norm_position="pre", pos_encoding="learned", dtype="float32", attention_impl=args.attention_impl,
        fused_qkv=True))  # the presets' layout, as compare_nanogpt.py
    tx = training.make_optimizer(optax.linear_schedule(1e-4, 1e-3, 9), weight_decay=0.1, grad_clip=1.0,
                                 b1=0.9, b2=0.95)
    state = training.init_train_state(model, tx, (jnp.zeros((1, cfg["block_size"]), jnp.int32),), seed=0)
    try:  # as train.py compiles its steps (a tree older than run/compiler_options.py: XLA's defaults)
        from transformer_jax.run.compiler_options import step_compiler_options
        options = step_compiler_options(args.onednn)
    except ImportError:
        options = None
    step = jax.jit(training.make_train_step(training.make_loss_fn(model, "clm"), tx), donate_argnums=0,
                   compiler_options=options)
    rng = np.random.default_rng(0)

    def batch() -> dict:
        x = rng.integers(0, VOCAB, size=(cfg["batch_size"], cfg["block_size"] + 1)).astype(np.int32)
        return {"inputs": x[:, :-1], "targets": x[:, 1:]}

    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(step.lower(state, batch()).compile().as_text())
    state, metrics = step(state, batch())  # compiles
    jax.block_until_ready(metrics)
    times = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        b = batch()
        start = time.process_time()
        state, metrics = step(state, b)
        jax.block_until_ready(metrics)
        times.append(time.process_time() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"source": os.path.dirname(os.path.dirname(transformer_jax.__file__)),
                      "config": args.config, "attention_impl": args.attention_impl,
                      "reuse_host_memory": reused, "compiler_options": options,
                      "cpu_ms_per_step": round(1e3 * statistics.median(times), 1),
                      "cpu_ms_min": round(1e3 * min(times), 1),
                      "sys_ms_per_step": round(1e3 * (after.ru_stime - usage.ru_stime) / args.steps, 1),
                      "page_faults_per_step": round((after.ru_minflt - usage.ru_minflt) / args.steps)}))


if __name__ == "__main__":
    main()
