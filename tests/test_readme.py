"""The README's examples, in the order a newcomer meets them, run in one temporary directory
at tiny sizes: every `python train.py ...` command of a bash block (with flags appended that
shrink the model and the run) and every Python block, so the front door cannot rot."""
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import train
from transformer_jax.data import corpora
from transformer_jax.objectives import common
from transformer_jax.run import trainer

README = Path(__file__).resolve().parents[1] / "README.md"
# Sections whose examples this test runs (the others belong to other modules' tests, or
# need a network, a cluster or an accelerator).
SECTIONS = {None, "Quick start", "Presets", "Data and tokenizers", "Objectives", "Fine-tuning",
            "Generation", "Scaling out", "Python API", "Training from Python"}
# Appended to every training command: a one-layer model, three steps, and a final sample
# only for the first (a generation compile per run would double the test's time).
TINY = ["--max-steps", "3", "--eval-every", "3", "--eval-batches", "1", "--log-every", "3",
        "--checkpoint-every", "3", "--batch-size", "8", "--seq-len", "16", "--sample-tokens", "0",
        "--d-model", "32", "--num-heads", "2", "--num-layers", "1", "--d-ff", "64", "--max-len", "32"]
CLUSTER_FLAGS = ("--coordinator-address", "--num-processes", "--process-id")


def readme_examples() -> list[tuple[str, object]]:
    """("train", argv) for each train.py command and ("python", code) for each Python block
    of the SECTIONS, in README order."""
    examples, section, block = [], None, None
    for line in README.read_text().splitlines():
        if block is None and line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            if block is None:
                block = (line[3:].strip(), [])
                continue
            language, body = block
            block = None
            if section not in SECTIONS:
                continue
            if language == "python":
                examples.append(("python", "\n".join(body)))
            elif language == "bash":
                examples += [("train", argv) for argv in _train_commands("\n".join(body))]
        elif block is not None:
            block[1].append(line)
    return examples


def _train_commands(script: str) -> list[list[str]]:
    """argv (after `python train.py`) of each train.py command of a bash script; a command
    ends at a line end outside quotes, and `&&` separates commands."""
    commands, pending = [], ""
    for line in re.sub(r"\\\n", " ", script).splitlines():
        pending += line + "\n"
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # inside a quoted string that goes on
            continue
        pending = ""
        while words:
            part = words[:words.index("&&")] if "&&" in words else words
            words = words[len(part) + 1:]
            while part and re.fullmatch(r"[A-Z_]+=\S*", part[0]):  # VAR=value prefixes
                part = part[1:]
            if part[:2] == ["python", "train.py"] and not any(w in CLUSTER_FLAGS for w in part):
                commands.append(part[2:])
    return commands


def test_readme_lists_the_examples_a_newcomer_runs():
    examples = readme_examples()
    commands = [" ".join(argv) for kind, argv in examples if kind == "train"]
    assert commands[0] == ""  # the main job: python train.py
    assert any(c.startswith("sample") for c in commands) and "--help" in commands
    assert any("--data shakespeare" in c for c in commands)
    assert any("--mesh data=2,fsdp=2,tensor=2" in c for c in commands)
    python = [code for kind, code in examples if kind == "python"]
    assert any("load_run(" in code and "generate_text(" in code for code in python)
    assert any("TrainConfig(" in code and "train(" in code for code in python)


@pytest.fixture
def newcomer_dir(tmp_path, monkeypatch):
    """A fresh directory with the README's own data files, small corpora standing in for
    the downloads, and no mesh unless a command asks for one (conftest fakes 8 devices)."""
    rng = np.random.default_rng(0)
    words = ["def", "main", "(", ")", ":", "return", "self", "x", "=", "1", "if", "else", "import"]
    text = " ".join(rng.choice(words, size=6000)) + "\n"
    monkeypatch.setattr(corpora, "stdlib_text", lambda: text)
    monkeypatch.setattr(corpora, "shakespeare_text", lambda cache_dir=None: text.upper())
    monkeypatch.setattr(common, "TOKEN_CACHE", str(tmp_path / "token_cache"))
    real_mesh = trainer.make_run_mesh
    monkeypatch.setattr(trainer, "make_run_mesh", lambda spec: None if spec is None else real_mesh(spec))
    work = tmp_path / "clone"
    (work / "my_corpus").mkdir(parents=True)
    (work / "my_corpus" / "a.txt").write_text(text[:20000])
    pairs = ["".join(rng.choice(list("abcdef"), size=rng.integers(2, 7))) for _ in range(200)]
    (work / "pairs.tsv").write_text("".join(f"{p}\t{p[::-1]}\n" for p in pairs))
    monkeypatch.chdir(work)
    return work


@pytest.mark.slow  # about a dozen tiny runs, each compiled once
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:--vocab-size:UserWarning")
def test_readme_examples_run_in_order(newcomer_dir, compile_cache_dir, capsys):
    namespace: dict = {}
    for kind, example in readme_examples():
        if kind == "python":
            exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102
            continue
        argv = list(example)
        what = " ".join(argv)
        if argv[:1] == ["sample"]:
            assert train.main(argv + ["--max-new-tokens", "8"]) == 0, what
            assert capsys.readouterr().out.startswith("def main("), what
        elif "--help" in argv:
            with pytest.raises(SystemExit):
                train.main(argv)
            usage = capsys.readouterr().out.splitlines()[0]
            assert "train.py sample" in usage, usage
        else:
            first = not os.path.isdir("runs")
            assert train.main(argv + TINY + (["--sample-tokens", "8"] if first else [])) == 0, what
            out = capsys.readouterr().out
            assert "already finished" in out or "step 3 |" in out, (what, out[-500:])
            if first:  # the quick start ends with a sample whose prompt is marked
                assert "[prompt, copied from the validation text]" in out, out[-500:]
    runs = sorted(os.listdir("runs"))
    # every command trained into a run of its own (the clm objective example is the quick start's)
    assert {"clm-stdlib", "clm-shakespeare", "clm-gpt2-small-my_corpus", "mlm",
            "seq2seq-reverse", "seq2seq-pairs", "classify-from-mlm-shuffle",
            "mesh-demo", "tiny-demo", "tiny-finetuned"} <= set(runs), runs
    with open("runs/classify-from-mlm-shuffle/metrics.jsonl") as f:
        assert "val_loss" in f.read() and "val_ppl" not in open(f.name).read()


@pytest.fixture
def compile_cache_dir(tmp_path):
    """JAX's compilation cache in the temporary directory, not the user's."""
    import jax

    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    yield
    jax.config.update("jax_compilation_cache_dir", saved)
