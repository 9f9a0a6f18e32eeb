"""End-to-end tests of train.py, called in-process (train.main(argv)) on a tiny preset."""
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

import train
from processes import cpu_env, free_port, run_together
from transformer_jax import checkpoint, generate_text, load_run
from transformer_jax.objectives import clm
from transformer_jax.run import make_run_mesh
from transformer_jax.run.out_dir import agree_on_out_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every train.main call jits fresh closures; a persistent cache turns the repeated,
    identical compilations into disk reads (about 5x less time for this module)."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    values = (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)
    for name, value in zip(names, values):
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~12k characters of pseudo-English with a small vocabulary (learnable in seconds)."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]
    text = " ".join(rng.choice(words, size=3000)) + "\n"
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text)
    return str(path)


def _args(corpus, out_dir, *extra, steps=12):
    # one device (the default would be a mesh over conftest's 8 virtual devices)
    return ["--preset", "tiny", "--data", corpus, "--out-dir", str(out_dir), "--mesh", "none", "--batch-size", "4",
            "--seq-len", "16", "--max-steps", str(steps), "--eval-every", "6", "--eval-batches", "2",
            "--log-every", "3", "--checkpoint-every", "6", "--sample-tokens", "0", *extra]


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(out_dir, step=None):
    with checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints")) as ckpt:
        return ckpt.restore_params(step)


def _leaves(tree):
    import jax
    return {"/".join(str(k.key) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A 40-step run shared by the tests that need a trained run."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert train.main(_args(corpus, out, "--lr", "1e-2", "--eval-every", "20", "--sample-tokens", "20",
                            steps=40)) == 0
    return str(out)


def test_loss_decreases_and_outputs_are_written(base_run):
    records = _metrics(base_run)
    assert [r["step"] for r in records] == sorted({*range(3, 40, 3), 20, 40})  # log, eval steps
    for r in records:
        assert {"step", "train_loss", "lr", "tokens_per_sec"} <= r.keys()
    # the compiling first step is reported on its own and kept out of tokens/s
    assert [r for r in records if "first_step_sec" in r] == records[:1]
    assert records[0]["first_step_sec"] > 0
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[-1] < 0.7 * np.log(14)  # well below uniform over the ~14 symbols
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"]
    names = os.listdir(base_run)
    for expected in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "checkpoints",
                     "sample.txt"):
        assert expected in names
    assert any(n.startswith("events.out.tfevents") for n in names)
    with open(os.path.join(base_run, "config.json")) as f:
        config = json.load(f)
    assert config["model"]["d_model"] == 32 and config["train"]["objective"] == "clm"
    with checkpoint.Checkpointer(os.path.join(base_run, "checkpoints")) as ckpt:
        assert ckpt.latest_step() == 40 and ckpt.best_step() == 40


def _sigterm_at(monkeypatch, stop_step):
    original = clm.make_clm_batch

    def batch(tokens, *, seed, step, **kw):
        if step == stop_step:
            signal.raise_signal(signal.SIGTERM)  # arrives mid-run, as from a scheduler
        return original(tokens, seed=seed, step=step, **kw)

    monkeypatch.setattr(clm, "make_clm_batch", batch)


@pytest.mark.slow  # five short runs
def test_exact_resume_after_sigterm_and_after_max_steps(corpus, tmp_path, monkeypatch):
    flags = ("--dropout", "0.1", "--decay-steps", "12")  # dropout: the rng must resume too
    assert train.main(_args(corpus, tmp_path / "straight", *flags)) == 0

    with monkeypatch.context() as m:
        _sigterm_at(m, 4)  # the handler lets step 5 finish, saves it and exits 0
        assert train.main(_args(corpus, tmp_path / "killed", *flags)) == 0
    with checkpoint.Checkpointer(tmp_path / "killed" / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 5
    assert train.main(_args(corpus, tmp_path / "killed", *flags)) == 0  # same command resumes

    assert train.main(_args(corpus, tmp_path / "short", *flags, steps=7)) == 0
    assert train.main(_args(corpus, tmp_path / "short", *flags, "--resume")) == 0

    want = _leaves(_params(tmp_path / "straight", 12))
    want_metrics = [(r["step"], r["train_loss"], r.get("val_loss")) for r in _metrics(tmp_path / "straight")]
    for name in ("killed", "short"):
        got = _leaves(_params(tmp_path / name, 12))
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
        got_metrics = [(r["step"], r["train_loss"], r.get("val_loss")) for r in _metrics(tmp_path / name)]
        stops = {"killed": 5, "short": 7}
        # the interrupted run logged its stopping step extra; everything else is identical
        assert [x for x in got_metrics if x[0] != stops[name]] == want_metrics


def _nan_at(monkeypatch, bad_step):
    original = clm.make_clm_batch

    def batch(tokens, *, seed, step, **kw):
        out = original(tokens, seed=seed, step=step, **kw)
        weights = np.ones(out["targets"].shape, np.float32)
        if step == bad_step:
            weights[0, 0] = np.nan
        return {**out, "weights": weights}

    monkeypatch.setattr(clm, "make_clm_batch", batch)


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(corpus, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 7)  # the 8th step
    with pytest.raises(FloatingPointError, match="at step 8"):
        train.main(_args(corpus, tmp_path / "stop"))
    with checkpoint.Checkpointer(tmp_path / "stop" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [6]

    assert train.main(_args(corpus, tmp_path / "skip", "--skip-nonfinite")) == 0
    params = _leaves(_params(tmp_path / "skip", 12))
    assert all(np.isfinite(v).all() for v in params.values())


def test_corrupt_latest_checkpoint_falls_back(base_run, corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    with checkpoint.Checkpointer(out / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
    assert steps[-1] == 40 and len(steps) >= 2
    for root, _, files in os.walk(out / "checkpoints" / "40" / "params"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(0)
    flags = ("--lr", "1e-2", "--eval-every", "20")
    with pytest.warns(UserWarning, match="step 40 .* unreadable"):
        assert train.main(_args(corpus, out, *flags, steps=40)) == 0
    # it resumed from the previous checkpoint and re-trained the lost steps exactly
    want = _leaves(_params(base_run, 40))
    got = _leaves(_params(out, 40))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_init_from_with_freezing(base_run, corpus, tmp_path):
    out = tmp_path / "finetune"
    freeze = "^(embedder|blocks/layer_0)/"
    assert train.main(_args(corpus, out, "--init-from", base_run, "--freeze", freeze, steps=6)) == 0
    before, after = _leaves(_params(base_run, 40)), _leaves(_params(out, 6))
    assert before.keys() == after.keys()
    for key in before:
        frozen = key.startswith(("embedder/", "blocks/layer_0/"))
        assert np.array_equal(before[key], after[key]) == frozen, key
    with open(out / "config.json") as f:
        assert json.load(f)["train"]["lr"] == pytest.approx(2e-4)  # a tenth of the default


@pytest.mark.slow  # three runs, one compiled for an 8-device mesh
def test_grad_accumulation_and_mesh_match_one_device(corpus, tmp_path, capfd):
    runs = {"full": (), "accum": ("--accum-steps", "2"),
            "mesh": ("--mesh", "data=2,fsdp=2,tensor=2", "--sample-tokens", "12")}
    for name, flags in runs.items():
        assert train.main(_args(corpus, tmp_path / name, *flags, steps=3)) == 0
    err = capfd.readouterr().err  # the final sample after a mesh run: no SPMD rematerialisation
    assert "Involuntary full rematerialization" not in err and (tmp_path / "mesh" / "sample.txt").exists()
    full = _leaves(_params(tmp_path / "full", 3))
    for name in ("accum", "mesh"):
        other = _leaves(_params(tmp_path / name, 3))
        for key in full:  # equal up to float summation order
            if key.endswith("key/bias"):
                # Softmax ignores a shift shared by all keys, so a key bias's gradient is exactly
                # zero: what Adam sees is rounding noise, normalised into steps that differ run to
                # run. Checked instead: every run leaves it at zero next to the other biases' moves.
                moved = np.abs(full[key.replace("key/bias", "query/bias")]).max()
                for run in (full, other):
                    assert np.abs(run[key]).max() <= 1e-2 * moved, (name, key, np.abs(run[key]).max(), moved)
                continue
            np.testing.assert_allclose(other[key], full[key], rtol=2e-4, atol=2e-6, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("flags, error", [
    (["--batch-size", "0"], "expected a positive integer"),
    (["--lr", "-1"], "expected a positive number"),
    (["--dropout", "1.5"], "expected a number in [0, 1)"),
    (["--objective", "gan"], "invalid choice"),
    (["--num-heads", "three"], "invalid int value"),
])
def test_invalid_flags_exit_with_usage_error(corpus, tmp_path, flags, error, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(_args(corpus, tmp_path / "r", *flags))
    assert e.value.code == 2
    assert error in capsys.readouterr().err


def test_errors_before_compiling(corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcdefghij" * 2)
    other = tmp_path / "other_tok"
    from transformer_jax import tokenizers
    tokenizers.build_tokenizer("char", "xyz").save(other)
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--data", str(empty)], "no text"),
        (["--data", str(tiny)], "seq_len"),
        (["--tokenizer", str(other)], "unknown to this char tokenizer"),
        (["--accum-steps", "3"], "accum-steps"),
        (["--warmup-steps", "50"], "warmup-steps"),
        (["--freeze", "^nothing/"], "freeze"),
        (["--seq-len", "32"], "max_len"),
        (["--num-heads", "3"], "num_heads"),
        (["--mesh", "data=3"], "data"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            train.main(_args(corpus, tmp_path / "r", *flags))
    assert not (tmp_path / "r").exists()  # nothing written before the flags were all valid
    with pytest.raises(ValueError, match="--resume"):
        train.main(_args(corpus, tmp_path / "none", "--resume"))


def test_incompatible_out_dir_needs_overwrite(base_run, corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    with pytest.raises(ValueError, match="d_model.*--overwrite"):
        train.main(_args(corpus, out, "--d-model", "64", steps=2))
    with pytest.raises(ValueError, match="freeze"):  # a failed --overwrite keeps the old run
        train.main(_args(corpus, out, "--d-model", "64", "--overwrite", "--freeze", "^x", steps=2))
    assert (out / "checkpoints" / "40").exists()
    assert train.main(_args(corpus, out, "--d-model", "64", "--overwrite", steps=2)) == 0
    with checkpoint.Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2]


def test_a_run_recorded_before_a_model_field_existed_resumes_as_it_was_trained(corpus, tmp_path):
    """The presets now fuse q/k/v (`fused_qkv`, added after runs were recorded without it):
    a run whose config.json lacks the field was trained with separate kernels and resumes
    with them from the same command; naming the field with another value is a change."""
    out = tmp_path / "run"
    small = ("--preset", "char-small", "--d-model", "32", "--num-heads", "2", "--num-layers", "1",
             "--d-ff", "64", "--max-len", "16", "--dropout", "0")
    assert train.main(_args(corpus, out, *small, "--fused-qkv", "false", steps=6)) == 0
    with open(out / "config.json") as f:
        record = json.load(f)
    del record["model"]["fused_qkv"]  # as the package wrote it before the field existed
    with open(out / "config.json", "w") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match=r"model.fused_qkv: False -> True.*--overwrite"):
        train.main(_args(corpus, out, *small, "--fused-qkv", "true", steps=12))
    assert train.main(_args(corpus, out, *small, steps=12)) == 0  # the preset's True yields
    params = _leaves(_params(out, 12))
    assert "blocks/layer_0/self_attn/query/kernel" in params and not any("qkv" in k for k in params)
    with open(out / "config.json") as f:
        assert json.load(f)["model"]["fused_qkv"] is False
    fresh = tmp_path / "fresh"  # the same command on a new directory: the preset's fused kernel
    assert train.main(_args(corpus, fresh, *small, steps=6)) == 0
    assert "blocks/layer_0/self_attn/qkv/kernel" in _leaves(_params(fresh, 6))


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "train.py sample" in text.splitlines()[0] and "subcommands: sample" in text
    for flag in ("--preset", "--data", "--out-dir", "--max-steps", "--batch-size", "--seq-len",
                 "--lr", "--seed", "--objective", "--tokenizer", "--eval-every",
                 "--checkpoint-every", "--init-from", "--resume", "--mesh", "--freeze",
                 "--accum-steps", "--skip-nonfinite", "--d-model", "--num-kv-heads", "--rope-base"):
        assert flag in text, flag


def test_sample_subcommand(base_run, capsys):
    with open(os.path.join(base_run, "sample.txt")) as f:
        final_sample = f.read()
    # the prompt (copied from the validation text) is marked apart from the model's text
    head, prompt, continuation = re.split(r"\[prompt, copied from the validation text\]\n|"
                                          r"\n\[the model's continuation\]\n", final_sample)
    assert head == "" and prompt and len(continuation) >= 20
    assert set(prompt + continuation) <= set("the cat sat on a mat and dog ran to it\n")
    capsys.readouterr()
    argv = ["sample", "--out-dir", base_run, "--prompt", "the ", "--max-new-tokens", "30"]
    assert train.main(argv + ["--strategy", "greedy"]) == 0
    greedy = capsys.readouterr().out.rstrip("\n")
    assert greedy.startswith("the ") and len(greedy) == 4 + 30  # one char per token
    assert train.main(argv + ["--strategy", "greedy"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == greedy
    with pytest.raises(ValueError, match="holds no run"):
        train.main(["sample", "--out-dir", os.path.join(base_run, "nothing")])

    # the library gives the same text: load_run + generate_text
    run = load_run(base_run)
    assert run.step == 40 and run.config.objective == "clm" and run.model_config.d_model == 32
    want = _leaves(_params(base_run, 40))
    for key, value in _leaves(run.params).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    assert "the " + generate_text(run.model, run.params, run.tokenizer, "the ", 30, strategy="greedy") == greedy


def test_finished_run_says_so_and_a_larger_max_steps_extends_it(base_run, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    flags = ("--lr", "1e-2", "--eval-every", "20", "--sample-tokens", "20")
    capsys.readouterr()
    assert train.main(_args(corpus, out, *flags, steps=40)) == 0
    said = capsys.readouterr().out
    assert "already finished" in said and "--max-steps 80" in said and "sample" in said
    assert len(_metrics(out)) == len(_metrics(base_run))  # nothing trained, nothing logged
    # warmup and decay were derived from --max-steps, so they follow it
    assert train.main(_args(corpus, out, *flags, steps=44)) == 0
    assert "resuming at step 40" in capsys.readouterr().out
    records = _metrics(out)
    assert records[-1]["step"] == 44
    with open(out / "config.json") as f:
        recorded = json.load(f)["train"]
    assert recorded["max_steps"] == recorded["decay_steps"] == 44
    with pytest.raises(ValueError, match="warmup_steps"):  # set explicitly: a real change
        train.main(_args(corpus, out, *flags, "--warmup-steps", "3", steps=48))


@pytest.mark.slow  # three objectives, three compilations
def test_mlm_then_classify_from_it_and_seq2seq(corpus, tmp_path, capsys):
    mlm, cls, s2s = tmp_path / "mlm", tmp_path / "cls", tmp_path / "s2s"
    assert train.main(_args(corpus, mlm, "--objective", "mlm", "--sample-tokens", "1", steps=6)) == 0
    assert "masked-token accuracy" in capsys.readouterr().out
    assert train.main(_args(corpus, cls, "--objective", "classify", "--init-from", str(mlm),
                            "--freeze", "^encoder/", "--sample-tokens", "1", steps=4)) == 0
    assert "accuracy on the validation batches" in capsys.readouterr().out
    assert all("val_ppl" not in r for r in _metrics(cls)) and "val_loss" in _metrics(cls)[-1]
    assert "val_ppl" in _metrics(mlm)[-1]
    encoder, classifier = _leaves(_params(mlm, 6)), _leaves(_params(cls, 4))
    shared = [k for k in classifier if k.startswith("encoder/")]
    assert shared and all(np.array_equal(classifier[k], encoder[k]) for k in shared)
    assert {k for k in classifier if not k.startswith("encoder/")} == {"classifier/kernel", "classifier/bias"}
    assert train.main(_args(corpus, s2s, "--objective", "seq2seq", "--data", "reverse",
                            "--sample-tokens", "1", steps=4)) == 0
    out = capsys.readouterr().out
    assert "exact match:" in out and "label_smoothing" not in out
    with open(s2s / "config.json") as f:
        assert json.load(f)["train"]["label_smoothing"] == 0.1


def test_every_flag_states_its_default_once(capsys):
    for parser in (train.build_parser(), train.sample_parser()):
        for action in parser._actions:
            if action.nargs == 0:  # --help and switches such as --resume take no value
                continue
            text = train.help_with_default(action) % vars(action)
            assert text.count("default") == 1 and "None" not in text, (action.dest, text)
    for argv in (["--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit):
            train.main(argv)
        assert "None" not in capsys.readouterr().out


def test_mesh_defaults_to_every_device_on_data(monkeypatch):
    import jax

    mesh = make_run_mesh(None)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}  # conftest's 8 devices
    assert make_run_mesh("none") is None
    assert dict(make_run_mesh("fsdp=4,tensor=2").shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert make_run_mesh(None) is None  # one device: no mesh, as before
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="multi-process"):
        make_run_mesh("none")


def test_default_mesh_needs_a_batch_that_splits(corpus, tmp_path):
    argv = [a for a in _args(corpus, tmp_path / "r") if a not in ("--mesh", "none")]
    with pytest.raises(ValueError, match="--batch-size=4 .* data\\*fsdp=8"):
        train.main(argv)
    assert not (tmp_path / "r").exists()


def test_only_process_0_decides_about_the_out_dir(base_run, tmp_path, monkeypatch):
    """The other processes take process 0's decision; they never judge the directory,
    which process 0 may be rewriting meanwhile."""
    import jax
    from jax.experimental import multihost_utils

    with open(os.path.join(base_run, "config.json")) as f:
        config = json.load(f)
    sent = []

    def broadcast(value, decision):
        sent.append(int(value))
        return np.int32(decision)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    for decision, want in ((1, True), (0, False)):
        monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda v, d=decision: broadcast(v, d))
        empty = str(tmp_path / "empty")  # process 1 sees no run here, process 0 one to resume
        assert agree_on_out_dir(empty, config, overwrite=False, resume=True) is want
        assert agree_on_out_dir(base_run, config, overwrite=False, resume=False) is want
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda v: broadcast(v, -1))
    with pytest.raises(ValueError, match="rejected by process 0"):
        agree_on_out_dir(base_run, config, overwrite=False, resume=False)

    monkeypatch.setattr(jax, "process_index", lambda: 0)  # process 0 broadcasts its verdict first
    sent.clear()
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda v: broadcast(v, int(v)))
    assert agree_on_out_dir(base_run, config, overwrite=False, resume=False) is True
    assert agree_on_out_dir(base_run, config, overwrite=True, resume=False) is False
    changed = {**config, "model": {**config["model"], "d_model": 64}}
    with pytest.raises(ValueError, match="d_model"):
        agree_on_out_dir(base_run, changed, overwrite=False, resume=False)
    assert sent == [1, 0, -1]


@pytest.mark.slow  # two processes, each compiling for a 4-device mesh
def test_two_processes_overwrite_a_shared_out_dir(base_run, corpus, tmp_path):
    out = tmp_path / "shared"
    shutil.copytree(base_run, out)  # an older run, replaced with --overwrite
    argv = [a for a in _args(corpus, out, "--overwrite", "--d-model", "64", steps=3)
            if a not in ("--mesh", "none")]  # the default mesh: all 4 devices of both processes
    argv += ["--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2"]
    codes, tails = run_together([["train.py", *argv, "--process-id", str(i)] for i in range(2)], tmp_path,
                                env=cpu_env(devices=2), timeout_s=300)
    assert codes == [0, 0], "\n---\n".join(tails)
    assert "on 4 cpu device(s)" in tails[0]
    with open(out / "config.json") as f:
        assert json.load(f)["model"]["d_model"] == 64
    assert [r["step"] for r in _metrics(out)] == [3]  # the old run's records are gone
    with checkpoint.Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]
