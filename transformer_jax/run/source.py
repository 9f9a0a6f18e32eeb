"""What `--init-from DIR` and `train.py sample --model DIR` name: a run directory of this
package or a Hugging Face model directory, told apart in one place (`source_kind`)."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from transformer_jax import run_dir

RUN, HF = "run", "hugging face"

# The from_pretrained model kinds whose weights each objective's model takes.
_KINDS = {"clm": ("decoder_lm",), "mlm": ("masked_lm", "encoder", "classifier"),
          "classify": ("masked_lm", "encoder", "classifier")}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def source_kind(path: str) -> str:
    """RUN for a run directory (config.json with a "model" section), HF for a Hugging Face
    model directory (config.json with "model_type", and safetensors weights).

    Raises ValueError naming `path` for anything else."""
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} holds no run and no Hugging Face model: it is not a directory")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} holds no run and no Hugging Face model: it has no config.json")
    record = run_dir.read_json(file, "the directory's config")
    if isinstance(record, dict) and isinstance(record.get("model"), dict):
        return RUN
    if isinstance(record, dict) and "model_type" in record:
        if not any(os.path.isfile(os.path.join(path, w)) for w in _WEIGHTS):
            raise ValueError(f"{path!r} is a Hugging Face config without weights: expected "
                             f"{' or '.join(_WEIGHTS)} beside its config.json")
        return HF
    raise ValueError(f"{path!r} holds no run and no Hugging Face model: its config.json has neither "
                     f"\"model\" (a run) nor \"model_type\" (Hugging Face)")


def hf_architecture(path: str, objective: str | None = None):
    """(ModelConfig, from_pretrained kind, HFTokenizer or None, config.json dict) of the Hugging
    Face directory `path`, from its files (no weight read). With `objective`, checks that the
    directory's model can serve it (ValueError otherwise, e.g. clm from a BERT directory)."""
    from transformer_jax.pretrained import loader
    from transformer_jax.pretrained.sentence import read_pooling
    from transformer_jax.pretrained.tokenizer import HFTokenizer

    hf = loader._read_json(os.path.join(path, "config.json"))
    family = loader._family(hf.get("model_type"))
    cfg, kind = family.from_hf(hf, read_pooling(path) is not None)
    if objective is not None and kind not in _KINDS.get(objective, ()):
        can = sorted(o for o, kinds in _KINDS.items() if kind in kinds) or ["none"]
        raise ValueError(f"--objective {objective} cannot start from {path!r}: its model_type "
                         f"{hf.get('model_type')!r} gives a {kind} model, which serves the objectives "
                         f"{', '.join(can)}")
    tokenizer = HFTokenizer.from_directory(path, hf, loader._max_length(path, cfg))
    return cfg, kind, tokenizer, hf


def hf_params(path: str) -> Any:
    """The parameters of the Hugging Face directory `path` as host float32 arrays, laid out
    as this package's task models hold them (an Encoder's under "encoder")."""
    import jax

    from transformer_jax.pretrained import from_pretrained
    from transformer_jax.pretrained.loader import MODEL_CLASSES

    pre = from_pretrained(path, tokenizer=False)  # the weights only
    params = jax.tree.map(np.asarray, pre.params)
    kind = next(k for k, c in MODEL_CLASSES.items() if type(pre.model) is c)
    if kind == "encoder":
        params = {"encoder": params}
    pooler = _pooler_keys(path)
    if pooler is not None and kind != "classifier":  # a BertModel's / BertForMaskedLM's pooler: kept
        from transformer_jax.pretrained.safetensors_io import TensorSource

        source = TensorSource(path)
        weight, bias = (np.asarray(source.read(k), np.float32) for k in pooler)
        params["pooler"] = {"kernel": weight.T, "bias": bias}  # torch Linear: [out, in]
    return params


def stack_layers(tree: Any) -> Any:
    """`tree` with every group `layer_0 .. layer_{n-1}` of a dict replaced by one `layers`
    subtree whose leaves stack theirs along a new leading axis (the `scan_layers` layout)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: stack_layers(v) for k, v in tree.items() if not k.startswith("layer_")}
    layers = sorted((int(k[len("layer_"):]), v) for k, v in tree.items() if k.startswith("layer_"))
    if layers:
        import jax

        out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *(stack_layers(v) for _, v in layers))
    return out


def load_run_tokenizer(directory: str):
    """The tokenizer saved in a run directory: an `HFTokenizer` again where the run was
    fine-tuned from a Hugging Face directory (its tokenizer_config.json says so: same ids,
    special tokens and maximum length), else `tokenizers.load_tokenizer`'s."""
    from transformer_jax import tokenizers

    config_file = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return tokenizers.load_tokenizer(directory)
    from transformer_jax.pretrained.tokenizer import HFTokenizer

    return HFTokenizer.from_saved(directory)


def load_generator(path: str):
    """(model, params, tokenizer, options) to generate from: a clm run's best (else newest)
    checkpoint or a Hugging Face causal LM directory (a DecoderLM; its tokenizer carries its
    eos id; options {}), or a Hugging Face Marian directory (an EncoderDecoder; options: the
    `generate` options transformers decodes it with, `marian.generation_options`).

    Raises ValueError for a directory that is neither, or holds no such model or no tokenizer."""
    if source_kind(path) == RUN:
        from transformer_jax.objectives import get_objective
        from transformer_jax.run.load import load_run

        run = load_run(path)
        if get_objective(run.config.objective).model_kind != "decoder_lm":
            raise ValueError(f"sample needs a causal LM; {path!r} is a {run.config.objective!r} run")
        return run.model, run.params, run.tokenizer, {}
    cfg, kind, tokenizer, hf = hf_architecture(path)
    if kind not in ("decoder_lm", "encoder_decoder"):
        raise ValueError(f"sample needs a causal LM or a translation model; {path!r} (model_type "
                         f"{hf.get('model_type')!r}) is a {kind} model")
    if tokenizer is None:
        raise ValueError(f"sample needs a tokenizer; {path!r} has no tokenizer.json")
    from transformer_jax.pretrained import from_pretrained

    pre = from_pretrained(path)
    options = {}
    if kind == "encoder_decoder":
        from transformer_jax.pretrained import marian

        options = marian.generation_options(hf)
    return pre.model, pre.params, pre.tokenizer, options


def _pooler_keys(path: str) -> tuple[str, str] | None:
    """The names of BERT's pooler tensors (dense weight, bias) in a Hugging Face directory, if any."""
    from transformer_jax.pretrained.safetensors_io import TensorSource

    keys = set(TensorSource(path).infos)
    for prefix in ("bert.pooler.dense.", "pooler.dense."):
        if {prefix + "weight", prefix + "bias"} <= keys:
            return prefix + "weight", prefix + "bias"
    return None


def has_pooler(path: str) -> bool:
    """Whether the --init-from source holds BERT's pooler (dense + tanh on [CLS]), which a
    classifier fine-tuned from it then keeps: a Hugging Face directory with pooler tensors,
    or a classify run that had one."""
    if source_kind(path) == HF:
        return _pooler_keys(path) is not None
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return bool(json.load(f).get("task", {}).get("pooler", False))
