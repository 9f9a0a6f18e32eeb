"""Seconds and peak host memory to load a Hugging Face directory: transformer_jax's
`from_pretrained` against transformers' (PyTorch, CPU), side by side.

Two comparisons per model, each load in a fresh child process, all runs interleaved (the
order rotates every repeat), medians (seconds) and maxima (memory) over the repeats:
- full: what `from_pretrained(dir)` returns (model, weights and tokenizer) against
  transformers' model class `from_pretrained(dir)` + `AutoTokenizer.from_pretrained(dir)`;
- model: the weights alone, `from_pretrained(dir, tokenizer=False)` against the model
  class's `from_pretrained(dir)`.
(A directory without tokenizer.json makes the two the same load.) The model classes are
the concrete ones (BertModel, GPT2LMHeadModel), resolved before the clock starts, as is
AutoTokenizer; neither side's package imports are timed (resolving transformers' model
class imports the `tokenizers` package, so our child imports it before the clock too).
Both libraries map the safetensors file and read weights lazily where they can, so the
script times the load and then the first full read of every weight (a sum over each
parameter: torch's, NumPy's on the CPU jax arrays' own buffers, since jnp.sum would add
XLA's compilation of one reduction per shape), and reports memory twice: the growth of
the peak resident set (VmHWM) over the resident set after the imports, after the load
and after that read, against the size of the weights (the safetensors files).
"load CPU s" is the process's user + system time during the load (steadier than seconds
on a shared machine). Run with an environment that has both libraries:

    /work/venv-peers/bin/python benchmarks/load.py [--repeats 5] [--gpt2-medium-dir DIR]

Models: all-MiniLM-L6-v2 (`transformer_jax.pretrained.minilm_path()`), and a random
gpt2-medium-sized GPT2LMHeadModel written by tests/fixtures/make_hf_fixtures.py into
DIR (default /tmp/transformer_jax_gpt2_medium; made when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
which, what, path, cls, root = sys.argv[1:6]
sys.path.insert(0, root)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
with_tokenizer = what == "full" and os.path.isfile(os.path.join(path, "tokenizer.json"))
if which in ("ours", "base"):
    import jax, numpy as np
    import tokenizers  # imported before the clock on both sides (resolving transformers' model class imports it)
    from transformer_jax.pretrained import from_pretrained
    jax.numpy.zeros(1).block_until_ready()  # start the runtime before measuring
    base = status("VmRSS"); start = time.perf_counter(); cpu = sum(os.times()[:2])
    pre = from_pretrained(path) if what == "full" else from_pretrained(path, tokenizer=False)
    jax.block_until_ready(pre.params)
    seconds = time.perf_counter() - start; cpu = sum(os.times()[:2]) - cpu; loaded = status("VmHWM") - base
    assert (pre.tokenizer is not None) == with_tokenizer
    # np.asarray of a CPU jax array is its buffer: a NumPy sum reads it without compiling per shape
    total = sum(float(np.asarray(x).sum()) for x in jax.tree.leaves(pre.params))
else:
    import torch, transformers
    torch.set_num_threads(os.cpu_count())
    model_cls, auto_tokenizer = getattr(transformers, cls), transformers.AutoTokenizer
    base = status("VmRSS"); start = time.perf_counter(); cpu = sum(os.times()[:2])
    model = model_cls.from_pretrained(path)
    if with_tokenizer:
        tokenizer = auto_tokenizer.from_pretrained(path)
    seconds = time.perf_counter() - start; cpu = sum(os.times()[:2]) - cpu; loaded = status("VmHWM") - base
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())
read = time.perf_counter() - start; added = status("VmHWM") - base
print(json.dumps(dict(seconds=seconds, cpu=cpu, read=read, loaded=loaded, added=added)))
"""

LABELS = {"ours": "transformer_jax", "base": "transformer_jax (--baseline-root)", "hf": "transformers (torch)"}


def weights_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def measure(which: str, what: str, path: str, cls: str, root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, what, path, cls, root],
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"the {which} {what} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpt2-medium-dir", default="/tmp/transformer_jax_gpt2_medium")
    parser.add_argument("--baseline-root", help="another transformer_jax source tree (e.g. a checkout "
                        "of an earlier commit) whose full load is measured too, interleaved")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from transformer_jax.pretrained import minilm_path

    if not os.path.isfile(os.path.join(args.gpt2_medium_dir, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fixtures", "make_hf_fixtures.py"),
                        "--gpt2-medium", args.gpt2_medium_dir], check=True)
    models = [("all-MiniLM-L6-v2", minilm_path(), "BertModel"),
              ("gpt2-medium (random)", args.gpt2_medium_dir, "GPT2LMHeadModel")]
    print(f"load average before: {load_average()}")
    print("| model | load | loader | load s | load CPU s | load + read all s | peak MB after load | "
          "after read | after read / weights | load s ours / theirs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path, cls in models:
        size = weights_bytes(path)
        has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
        kinds = [(w, what) for what in (("full", "model") if has_tokenizer else ("full",)) for w in ("ours", "hf")]
        if args.baseline_root:  # its full load (an older from_pretrained may lack tokenizer=False)
            kinds.insert(0, ("base", "full"))
        runs = {k: [] for k in kinds}
        for r in range(args.repeats):  # interleaved, so all see the same state of a shared machine
            for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                root = args.baseline_root if k[0] == "base" else ROOT
                runs[k].append(measure(*k, path, cls, root))
        for which, what in kinds:
            rs = runs[which, what]
            median = lambda key, rs=rs: statistics.median(r[key] for r in rs)  # noqa: E731
            ratio = "" if which == "hf" else \
                f"{median('seconds') / statistics.median(r['seconds'] for r in runs['hf', what]):.2f}"
            loaded, added = max(r["loaded"] for r in rs), max(r["added"] for r in rs)
            label = "model" if what == "model" else "model + tokenizer" if has_tokenizer else "model (no tokenizer.json)"
            print(f"| {name} ({size / 2**20:.0f} MB) | {label} | {LABELS[which]} | {median('seconds'):.3f} | "
                  f"{median('cpu'):.3f} | {median('read'):.3f} | {loaded / 2**20:.0f} | {added / 2**20:.0f} | "
                  f"{added / size:.2f} | {ratio} |", flush=True)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
