"""Every GPU figure that matters, in one device call of at most 7 minutes.

    PYTHONPATH=. python3 benchmarks/essentials.py --out $OUT/essentials      # on a GPU
    python benchmarks/essentials.py --smoke --out /tmp/essentials             # CPU, tiny shapes

Parts, each a child process with its own time limit (so one that hangs or runs out of
memory costs only its own slot; the limits add up to 7 minutes):
  kernels    the Pallas kernel's tests, compiled for the GPU by Triton (outputs and
             gradients against the float64 reference): tests/test_pallas_attention.py
  attention  every implementation (cuDNN and Pallas included) at d=128, n = 2k, 8k, 16k,
             causal and not, forward and forward+backward: benchmarks/attention.py, once per
             length (16k first, 8k and 2k last)
  train      gpt2-small training tokens/s and MFU: benchmarks/train_throughput.py
  generate   gpt2-small decoding tokens/s with and without the KV cache at a 1k context:
             benchmarks/generate.py
Prints one summary table at the end and writes essentials.json (plus each part's own log
and output files) into --out. `--smoke` runs the same parts on tiny CPU shapes: the test
suite runs it, so the script cannot rot between the rare sessions that have a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Attention runs once per sequence length (longest first), so a part that runs out of time
# loses only its own length; the order is that of what the figures are worth.
PARTS = ("kernels", "attention16k", "train", "generate", "attention8k", "attention2k")
ATTENTION_LENGTHS = {"attention16k": 16384, "attention8k": 8192, "attention2k": 2048}


def part_commands(part: str, out: str, smoke: bool) -> tuple[list[str], float]:
    """The argv of `part` (run from the repository root) and its time limit in seconds."""
    py = sys.executable
    if part == "kernels":
        selection = ["-k", "bad_input"] if smoke else []  # interpret mode is too slow for a smoke run
        return [py, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                "tests/test_pallas_attention.py", f"--junitxml={out}/kernels.xml", *selection], 50
    if part in ATTENTION_LENGTHS:
        n = ATTENTION_LENGTHS[part]
        shapes = (["--seq-lens", str(n // 512), "--head-dims", "16", "--heads", "2", "--batch", "1", "--repeats",
                   "1", "--implementations", "reference", "blockwise", "xla", "auto"] if smoke else
                  ["--grid", "flash", "--seq-lens", str(n), "--head-dims", "128", "--repeats", "20"])
        limit = {16384: 90, 8192: 55, 2048: 45}[n]
        return [py, "benchmarks/attention.py", *shapes, "--out", os.path.join(out, part)], limit
    if part == "train":
        shapes = (["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1"]
                  if smoke else ["--preset", "gpt2-small", "--batch-size", "12", "--seq-len", "1024",
                                 "--dtype", "bfloat16", "--steps", "20"])
        return [py, "benchmarks/train_throughput.py", *shapes, "--json", f"{out}/train.json"], 80
    if part == "generate":
        shapes = (["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--batch-sizes", "1",
                   "--repeats", "1"] if smoke else
                  ["--preset", "gpt2-small", "--prompt-len", "960", "--new-tokens", "64", "--dtype", "bfloat16",
                   "--batch-sizes", "1", "32", "--repeats", "3"])
        return [py, "benchmarks/generate.py", *shapes, "--json", f"{out}/generate.json"], 100
    raise ValueError(f"part={part!r} is not one of {PARTS}")


# A smoke run's parts are tiny but compile on a CPU that the test suite keeps busy: the
# device limits above are sized for a GPU, so a smoke part gets this one instead.
SMOKE_LIMIT_S = 300


def run_part(part: str, out: str, smoke: bool, env: dict) -> dict:
    """Runs one part as a child process; its output goes to <out>/<part>.log."""
    argv, limit = part_commands(part, out, smoke)
    limit = SMOKE_LIMIT_S if smoke else limit
    for stale in (f"{part}.xml", f"{part}.json", os.path.join(part, "attention.json")):
        if os.path.exists(os.path.join(out, stale)):  # never report an earlier run's figures
            os.remove(os.path.join(out, stale))
    start = time.perf_counter()
    with open(os.path.join(out, f"{part}.log"), "w") as log:
        try:
            code = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=limit).returncode
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - start
    print(f"[{part}] {status} in {seconds:.0f} s (log: {part}.log)", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "command": " ".join(argv[1:])}


def read_results(part: str, out: str) -> dict:
    """What `part` wrote, reduced to what the summary needs ({} if it wrote nothing)."""
    try:
        if part == "kernels":
            suite = ElementTree.parse(os.path.join(out, "kernels.xml")).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            failed = [case.get("name") for case in suite.iter("testcase")
                      if case.find("failure") is not None or case.find("error") is not None]
            return {**counts, "failed": failed}
        if part in ATTENTION_LENGTHS:
            with open(os.path.join(out, part, "attention.json")) as f:
                return {"rows": json.load(f)["rows"]}
        with open(os.path.join(out, f"{part}.json")) as f:
            return json.load(f)
    except (OSError, ValueError, AttributeError) as e:
        return {"missing": f"{type(e).__name__}: {e}"}


def summary(results: dict) -> str:
    """One table of every figure, as plain text."""
    lines = []
    kernels = results.get("kernels", {})
    if "tests" in kernels:
        lines.append(f"Pallas kernel tests: {kernels['tests']} run, {kernels['failures'] + kernels['errors']} "
                     f"failed, {kernels['skipped']} skipped" + (f" ({', '.join(kernels['failed'])})"
                                                                 if kernels["failed"] else ""))
    rows = [row for part in ATTENTION_LENGTHS for row in results.get(part, {}).get("rows", [])]
    if rows:
        lines.append("Attention TFLOP/s, forward / forward+backward (status where not timed):")
        shapes = sorted(dict.fromkeys((r["seq_len"], r["head_dim"], r["causal"]) for r in rows))
        header = f"{'implementation':<16}" + "".join(
            f"{f'n={n} d={d}' + (' causal' if c else ''):>22}" for n, d, c in shapes)
        lines.append(header)
        for impl in dict.fromkeys(r["implementation"] for r in rows):
            cells = []
            for shape in shapes:
                row = next((r for r in rows if r["implementation"] == impl
                            and (r["seq_len"], r["head_dim"], r["causal"]) == shape), None)
                if row is None:
                    cells.append("-")
                elif row.get("status") == "ok":
                    choice = f" [{row['auto_choice']}]" if impl == "auto" else ""
                    cells.append(f"{row['fwd_tflops']:.1f} / {row['fwd_bwd_tflops']:.1f}{choice}")
                else:
                    cells.append(row.get("status", "?").split(":")[0])
            lines.append(f"{impl:<16}" + "".join(f"{c:>22}" for c in cells))
    train = results.get("train", {})
    if "tokens_per_sec" in train:
        mfu = f", MFU {100 * train['mfu']:.1f}%" if train.get("mfu") else ""
        lines.append(f"Training {train['preset']} ({train['dtype']}, batch {train['batch_size']}x{train['seq_len']}): "
                     f"{train['tokens_per_sec']:,} tokens/s, {train['median_step_ms']} ms/step{mfu}, "
                     f"compile {train['compile_s']} s")
    generate = results.get("generate", {})
    for row in generate.get("results", []):
        lines.append(f"Decoding {generate['preset']} prompt {generate['prompt_len']} + {generate['new_tokens']}, "
                     f"batch {row['batch']}, cache={row['cache']}: {row['tokens_per_s']:.0f} tokens/s "
                     f"({row['speedup']:.1f}x the uncached), tokens agree {row['tokens_agree']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "essentials"))
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes (the test suite runs this)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    if not args.smoke:
        env["TRANSFORMER_JAX_TEST_PLATFORM"] = "cuda"  # tests/conftest.py: run the kernel tests on the GPU
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "smoke": args.smoke, "parts": {}, "results": {}}
    for part in args.parts:
        report["parts"][part] = run_part(part, out, args.smoke, env)
        report["results"][part] = read_results(part, out)
        with open(os.path.join(out, "essentials.json"), "w") as f:  # after every part: a timeout keeps the rest
            json.dump(report, f, indent=1)
    report["summary"] = summary(report["results"])
    with open(os.path.join(out, "essentials.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n" + report["summary"], flush=True)
    return report


if __name__ == "__main__":
    main()
