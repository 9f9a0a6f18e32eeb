"""Training runs as a library: `train(TrainConfig(...))` and `load_run(dir)`.

    from transformer_jax import TrainConfig, train, load_run, generate_text
    result = train(TrainConfig(preset="tiny", max_steps=200, out_dir="runs/demo"))
    run = load_run("runs/demo")
    print(generate_text(run.model, run.params, run.tokenizer, "def ", 100))

Modules, one idea each:
  trainer.py           train(): the run from validation to the final sample
  steps.py             the optimiser and the jitted train/eval steps, on one device or a mesh
  compiler_options.py  opt-in XLA options of those steps: CPU matrix products through oneDNN
  loop.py              the step loop: logging, evaluation, checkpoints, stop signals
  out_dir.py           resume or start fresh: config.json, the compatibility rules
  load.py              load_run(), and the parameters --init-from starts from
  compile_cache.py     JAX's persistent compilation cache
  host_memory.py       opt-in: malloc keeps freed host memory for the next step (CPU)
"""
from transformer_jax.run.compile_cache import disable_compile_cache, enable_compile_cache
from transformer_jax.run.load import LoadedRun, init_params_from, load_run, read_run_config
from transformer_jax.run.steps import CompiledRun, compile_run, make_run_mesh
from transformer_jax.run.trainer import TrainResult, build_task, train

__all__ = [
    "CompiledRun",
    "LoadedRun",
    "TrainResult",
    "build_task",
    "compile_run",
    "disable_compile_cache",
    "enable_compile_cache",
    "init_params_from",
    "load_run",
    "make_run_mesh",
    "read_run_config",
    "train",
]
