"""transformer_jax.train_config and transformer_jax.run without training: how a TrainConfig
resolves its defaults, validation, run directories, load_run's errors and the compile cache.
(Training runs themselves are tested through train.py in test_train_cli.py and the README
walk in test_readme.py.)"""
import json

import jax
import pytest

from transformer_jax import TrainConfig, load_run
from transformer_jax.run import compile_cache
from transformer_jax.run.out_dir import run_record, validate_out_dir
from transformer_jax.train_config import RECORDED, default_out_dir


def test_cpu_defaults_are_the_small_char_model_for_a_few_minutes():
    c = TrainConfig().resolve(accelerator=False)
    assert (c.preset, c.batch_size, c.seq_len, c.max_steps, c.lr, c.dtype) == ("char-small", 16, 64, 1000, 2e-3, "float32")
    assert c.model == {"d_model": 128, "num_heads": 4, "num_layers": 4, "d_ff": 512, "max_len": 64}
    assert (c.dropout, c.warmup_steps, c.decay_steps, c.eval_every, c.log_every) == (0.0, 50, 1000, 250, 20)
    assert c.out_dir == "runs/clm-stdlib" and c.data == "stdlib" and c.label_smoothing == 0.0
    a = TrainConfig().resolve(accelerator=True)
    assert (a.preset, a.batch_size, a.seq_len, a.max_steps, a.dtype, a.model) == (
        "char-small", 64, 256, 5000, "bfloat16", {})
    # a longer --seq-len on the CPU model widens its position table with it
    assert TrainConfig(seq_len=128).resolve(accelerator=False).model["max_len"] == 128


def test_seq_len_defaults_to_what_the_preset_allows():
    assert TrainConfig(preset="tiny").resolve(accelerator=False).seq_len == 16  # tiny's max_len
    assert TrainConfig(preset="tiny", model={"max_len": 32}).resolve(accelerator=False).seq_len == 32
    assert TrainConfig(preset="gpt2-small").resolve(accelerator=True).seq_len == 256
    assert TrainConfig(preset="tiny", seq_len=40).resolve(accelerator=False).seq_len == 40  # asked: kept


def test_each_example_gets_its_own_out_dir(tmp_path):
    assert default_out_dir(TrainConfig()) == "runs/clm-stdlib"
    assert default_out_dir(TrainConfig(data="shakespeare")) == "runs/clm-shakespeare"
    assert default_out_dir(TrainConfig(preset="gpt2-small", data="my_corpus/")) == "runs/clm-gpt2-small-my_corpus"
    assert default_out_dir(TrainConfig(objective="seq2seq", data="data/pairs.tsv")) == "runs/seq2seq-pairs"
    assert default_out_dir(TrainConfig(objective="classify", init_from="runs/mlm")) == "runs/classify-from-mlm-shuffle"
    source = tmp_path / "mlm"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model": {
        "vocab_size": 20, "max_len": 24, "d_model": 16, "num_heads": 2, "num_layers": 1, "d_ff": 32}}))
    c = TrainConfig(objective="classify", init_from=str(source)).resolve(accelerator=False)
    assert c.preset is None and c.seq_len == 24 and c.lr == pytest.approx(2e-4)  # the source's context


@pytest.mark.parametrize("fields, message", [
    (dict(batch_size=0), "batch_size=0: expected a positive integer"),
    (dict(max_steps=2.5), "max_steps=2.5"),
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(dropout=1.0), r"dropout=1.0: expected a number in \[0, 1\)"),
    (dict(pooling="max"), "pooling='max'"),
    (dict(model={"d_modle": 3}), "d_modle"),
])
def test_invalid_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_invalid_combinations_fail_when_resolved():
    with pytest.raises(ValueError, match="accum-steps"):
        TrainConfig(batch_size=6, accum_steps=4).resolve(accelerator=False)
    with pytest.raises(ValueError, match="warmup-steps"):
        TrainConfig(max_steps=10, warmup_steps=10).resolve(accelerator=False)
    with pytest.raises(ValueError, match="objective='gan': expected one of"):
        TrainConfig(objective="gan").resolve(accelerator=False)


def test_derived_schedule_may_change_on_resume_but_a_set_one_may_not(tmp_path):
    def record(config):
        resolved = config.resolve(accelerator=False)
        return run_record({"d_model": 8}, resolved.record(), {}, config.derived())

    old = record(TrainConfig(max_steps=100))
    assert set(old["train"]) == set(RECORDED) and old["derived"] == ["warmup_steps", "decay_steps"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert validate_out_dir(str(tmp_path), record(TrainConfig(max_steps=400)), overwrite=False, resume=False)
    with pytest.raises(ValueError, match="decay_steps: 100 -> 400"):
        validate_out_dir(str(tmp_path), record(TrainConfig(max_steps=400, decay_steps=400)),
                         overwrite=False, resume=False)
    with pytest.raises(ValueError, match="train.lr"):
        validate_out_dir(str(tmp_path), record(TrainConfig(max_steps=100, lr=1.0)), overwrite=False, resume=False)
    assert not validate_out_dir(str(tmp_path / "new"), old, overwrite=False, resume=False)


def test_load_run_needs_a_run(tmp_path):
    with pytest.raises(ValueError, match="holds no run"):
        load_run(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON .*truncated or damaged"):
        load_run(str(tmp_path))


@pytest.fixture
def fresh_jax_cache_config():
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_compilation_cache_max_size", "jax_enable_compilation_cache")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_compile_cache_goes_under_the_package_cache_unless_jax_has_one(tmp_path, fresh_jax_cache_config):
    jax.config.update("jax_compilation_cache_dir", None)
    path = compile_cache.enable_compile_cache(str(tmp_path / "cache"))
    assert path == str(tmp_path / "cache") and jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_compilation_cache_max_size > 0  # a size limit: JAX then locks the files
    assert compile_cache.DEFAULT_DIR.startswith("~/.cache/transformer_jax/")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert compile_cache.enable_compile_cache() == str(tmp_path / "mine")  # the user's own dir wins
    compile_cache.disable_compile_cache()
    assert not jax.config.jax_enable_compilation_cache
