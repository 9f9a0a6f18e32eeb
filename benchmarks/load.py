"""Seconds and peak host memory to load a Hugging Face directory: transformer_jax's
`from_pretrained` against transformers' `from_pretrained` (PyTorch, CPU), side by side.

Each load runs in a fresh child process, the two libraries' runs interleaved; the table
gives medians (seconds) and maxima (memory) over the repeats. Both libraries map the
safetensors file and read weights lazily where they can, so the script times the load and
then the first full read of every weight (a sum over each parameter: torch's, NumPy's on
the CPU jax arrays' own buffers, since jnp.sum would add XLA's compilation of one reduction
per shape), and reports memory twice: the growth of the peak resident set (VmHWM) over the
resident set after the imports, after the load and after that read, against the size of
the weights (the safetensors files).
"load CPU s" is the process's user + system time during the load (steadier than seconds
on a shared machine). Our load includes parsing tokenizer.json (its time alone is shown
too); transformers' model load does not: its AutoTokenizer time is shown beside it. Run
with an environment that has both libraries:

    /work/venv-peers/bin/python benchmarks/load.py [--repeats 3] [--gpt2-medium-dir DIR]

Models: all-MiniLM-L6-v2 (`transformer_jax.pretrained.minilm_path()`), and a random
gpt2-medium-sized GPT2LMHeadModel written by tests/fixtures/make_hf_fixtures.py into
DIR (default /tmp/transformer_jax_gpt2_medium; made when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
which, path, cls = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "ours":
    import jax
    from transformer_jax.pretrained import from_pretrained
    jax.numpy.zeros(1).block_until_ready()  # start the runtime before measuring
    base = status("VmRSS"); start = time.perf_counter(); cpu = sum(os.times()[:2])
    pre = from_pretrained(path)
    jax.block_until_ready(pre.params)
    seconds = time.perf_counter() - start; cpu = sum(os.times()[:2]) - cpu; loaded = status("VmHWM") - base
    import numpy as np  # np.asarray of a CPU jax array is its buffer: a NumPy sum reads it without
    total = sum(float(np.asarray(x).sum()) for x in jax.tree.leaves(pre.params))  # compiling per shape
    read = time.perf_counter() - start; added = status("VmHWM") - base
    from transformer_jax.pretrained.tokenizer import HFTokenizer  # part of the load: timed again alone
    t = time.perf_counter(); HFTokenizer.from_directory(path, pre.hf_config, 512); tokenizer = time.perf_counter() - t
else:
    import torch, transformers
    torch.set_num_threads(os.cpu_count())
    model_cls = getattr(transformers, cls)
    base = status("VmRSS"); start = time.perf_counter(); cpu = sum(os.times()[:2])
    model = model_cls.from_pretrained(path)
    seconds = time.perf_counter() - start; cpu = sum(os.times()[:2]) - cpu; loaded = status("VmHWM") - base
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())
    read = time.perf_counter() - start; added = status("VmHWM") - base
    t = time.perf_counter()  # not part of the model's load: timed after it
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        transformers.AutoTokenizer.from_pretrained(path)
    tokenizer = time.perf_counter() - t
print(json.dumps(dict(seconds=seconds, cpu=cpu, read=read, tokenizer=tokenizer, loaded=loaded, added=added)))
"""


def weights_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def measure(which: str, path: str, cls: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), which, path, cls],
                         capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpt2-medium-dir", default="/tmp/transformer_jax_gpt2_medium")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from transformer_jax.pretrained import minilm_path

    if not os.path.isfile(os.path.join(args.gpt2_medium_dir, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fixtures", "make_hf_fixtures.py"),
                        "--gpt2-medium", args.gpt2_medium_dir], check=True)
    models = [("all-MiniLM-L6-v2", minilm_path(), "BertModel"),
              ("gpt2-medium (random)", args.gpt2_medium_dir, "GPT2LMHeadModel")]
    print("| model | weights MB | loader | load s | load CPU s | load + read all s | tokenizer.json s | "
          "peak MB after load | after read | after read / weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path, cls in models:
        size = weights_bytes(path)
        runs = {"ours": [], "hf": []}
        for _ in range(args.repeats):  # interleaved, so both see the same state of a shared machine
            for which in runs:
                runs[which].append(measure(which, path, cls))
        for which, label in (("ours", "transformer_jax"), ("hf", "transformers (torch)")):
            median = lambda k: sorted(r[k] for r in runs[which])[len(runs[which]) // 2]  # noqa: E731
            loaded, added = max(r["loaded"] for r in runs[which]), max(r["added"] for r in runs[which])
            tokenizer = f"{median('tokenizer'):.2f}" + (" (in load)" if which == "ours" else " (not in load)")
            print(f"| {name} | {size / 2**20:.0f} | {label} | {median('seconds'):.2f} | {median('cpu'):.2f} | "
                  f"{median('read'):.2f} | {tokenizer} | {loaded / 2**20:.0f} | {added / 2**20:.0f} | "
                  f"{added / size:.2f} |", flush=True)

if __name__ == "__main__":
    main()
