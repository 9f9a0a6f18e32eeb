"""Smoke runs of the benchmark scripts on tiny CPU shapes.

The figures they produce here mean nothing; what is checked is that each script runs to
the end, checks correctness before timing, and writes the results it promises, so that a
session with a borrowed GPU does not spend its device time on a broken script.
"""
import json
import math

from processes import cpu_env, run_together


def _run(tmp_path, *argv, timeout_s=300):
    codes, tails = run_together([list(argv)], tmp_path, env=cpu_env(), timeout_s=timeout_s)
    assert codes == [0], f"{argv} exited {codes}\n{tails[0]}"
    return tails[0]


def test_attention_benchmark_checks_then_times_every_variant(tmp_path):
    _run(tmp_path, "benchmarks/attention.py", "--seq-lens", "33", "--head-dims", "16", "--heads", "2",
         "--batch", "1", "--implementations", "reference", "blockwise", "cudnn", "auto", "--repeats", "1",
         "--blockwise-blocks", "16", "8", "--out", str(tmp_path))
    with open(tmp_path / "attention.json") as f:
        rows = json.load(f)["rows"]
    assert len(rows) == 2 * 4  # causal and not, four implementations
    for row in rows:
        if row["implementation"] == "cudnn":
            assert row["status"].startswith("unavailable"), row
            continue
        assert row["status"] == "ok", row
        assert row["max_error"] <= 2e-3 and row["max_grad_error"] <= 2e-3, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert {r["block_sizes"] for r in rows if r["implementation"] == "blockwise"} == {"(16, 8)"}
    assert (tmp_path / "attention.csv").exists()


def test_pallas_tuner_runs_every_stage_in_interpret_mode(tmp_path):
    log = _run(tmp_path, "benchmarks/tune_pallas.py", "--interpret", "--seq-len", "32", "--tokens", "32",
               "--hidden", "64", "--head-dims", "64", "--max-per-stage", "2", "--repeats", "1",
               "--dtype", "float32", "--causal", "yes", "--out", str(tmp_path))
    with open(tmp_path / "tune_pallas.json") as f:
        result = json.load(f)
    stages = [c["stage"] for c in result["candidates"]]
    assert stages == [s for s in ("forward tiles", "forward launch", "backward tiles", "backward launch")
                      for _ in range(2)]
    assert all("seconds" in c for c in result["candidates"]), result["candidates"]
    assert set(result["best"]) == {"64"}
    assert "(64, 'sm80'): BlockSizes(" in log


def test_generate_benchmark_compares_cached_and_uncached_tokens(tmp_path):
    out = tmp_path / "generate.json"
    _run(tmp_path, "benchmarks/generate.py", "--preset", "tiny", "--prompt-len", "8", "--new-tokens", "4",
         "--batch-sizes", "2", "--repeats", "1", "--json", str(out))
    with open(out) as f:
        results = json.load(f)["results"]
    assert [(r["batch"], r["cache"]) for r in results] == [(2, True), (2, False)]
    assert all(r["tokens_agree"] == 1.0 for r in results)


def test_train_throughput_benchmark_reports_a_finite_loss(tmp_path):
    out = tmp_path / "throughput.json"
    _run(tmp_path, "benchmarks/train_throughput.py", "--steps", "2", "--warmup", "1", "--json", str(out))
    with open(out) as f:
        result = json.load(f)
    assert result["tokens_per_sec"] > 0 and result["median_step_ms"] > 0
    # random tokens over the tiny preset's 61 symbols: the loss starts near ln(61)
    assert math.isfinite(result["final_loss"]) and result["final_loss"] < 2 * math.log(61)


def test_gpu_essentials_smoke_run_fills_every_part_of_the_summary(tmp_path):
    """benchmarks/essentials.py --smoke: the one-call GPU script, on tiny CPU shapes."""
    # Six parts, each limited to essentials.SMOKE_LIMIT_S (300 s) by the script itself.
    log = _run(tmp_path, "benchmarks/essentials.py", "--smoke", "--out", str(tmp_path / "essentials"),
               timeout_s=6 * 300 + 60)
    with open(tmp_path / "essentials" / "essentials.json") as f:
        report = json.load(f)
    assert {part: r["status"] for part, r in report["parts"].items()} == {
        part: "ok" for part in ("kernels", "attention16k", "attention8k", "attention2k", "train", "generate")}
    results = report["results"]
    assert results["kernels"]["tests"] > 0 and results["kernels"]["failures"] == 0
    for part in ("attention16k", "attention8k", "attention2k"):
        assert [r["status"] for r in results[part]["rows"]] == ["ok"] * 8, part  # 4 implementations x causal
    assert results["train"]["tokens_per_sec"] > 0
    assert all(r["tokens_agree"] == 1.0 for r in results["generate"]["results"])
    for line in ("Pallas kernel tests:", "Attention TFLOP/s", "Training tiny", "Decoding tiny"):
        assert line in report["summary"] and line in log
