"""`from_pretrained` and `save_pretrained`: Hugging Face directories <-> our models.

Loading checks everything it can before reading any weight (config options, every
checkpoint key known, every parameter filled, every shape right: headers only), then
takes one tensor at a time, converts it where our layout differs, and places it on the
device (or, given a mesh, directly with its shardings from `transformer_jax.sharding`),
so host memory holds at most one converted tensor (and one reused read buffer) beyond
the placed parameters. On a CPU backend the placed parameters are the host arrays
themselves (device_put aliases aligned data): a float32 tensor stored as we store it at
an aligned offset stays a view of the file's pages, read when first used (see
`safetensors_io`), and every other parameter is a slot of one arena filled at load (see
`_place_on_cpu`). A failure raises before anything is returned.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer_jax import models
from transformer_jax.config import DTYPES, ModelConfig
from transformer_jax.layers.attention import split_qkv
from transformer_jax.pretrained import bert, gpt2, llama, marian
from transformer_jax.pretrained.common import Entry
from transformer_jax.pretrained.safetensors_io import (
    ALIGNMENT, DEFAULT_MAX_SHARD_SIZE, FLOAT_DTYPES, TensorInfo, TensorSource, host_empty, parse_size,
    stage_checkpoint, write_tmp_text)
from transformer_jax.pretrained.sentence import Pooling, pooling_directories, pooling_files, read_pooling
from transformer_jax.pretrained.tokenizer import HFTokenizer
from transformer_jax.tokenizers import TOKENIZER_FILE

CONFIG_FILE = "config.json"
FAMILIES = {t: family for family in (gpt2, bert, llama, marian) for t in family.MODEL_TYPES}
MODEL_CLASSES = {"decoder_lm": models.DecoderLM, "encoder": models.Encoder,
                 "masked_lm": models.MaskedLM, "encoder_decoder": models.EncoderDecoder,
                 "classifier": models.SequenceClassifier}


def _build(kind: str, cfg: ModelConfig, hf: dict) -> nn.Module:
    if kind == "classifier":  # BERT's: pooler (dense + tanh) on the [CLS] token
        return models.SequenceClassifier(cfg, num_classes=bert.num_labels(hf), pooling="first", pooler=True)
    return MODEL_CLASSES[kind](cfg)


def _classes(model: nn.Module) -> tuple:
    """The extra argument a classifier's table and config need (its number of classes)."""
    return (model.num_classes,) if isinstance(model, models.SequenceClassifier) else ()


class Pretrained(NamedTuple):
    """What `from_pretrained` returns.

    model: a DecoderLM, Encoder, MaskedLM, SequenceClassifier or EncoderDecoder; params: its parameters
    (float32, `model.apply({"params": params}, ...)`); tokenizer: an `HFTokenizer` or
    None; config: the `ModelConfig`; pooling: a `Pooling` for a sentence-transformers
    directory, else None; hf_config: the directory's config.json as a dict (special
    token ids such as eos_token_id and decoder_start_token_id live there).
    """

    model: nn.Module
    params: dict
    tokenizer: HFTokenizer | None
    config: ModelConfig
    pooling: Pooling | None = None
    hf_config: dict | None = None


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, tokenizer: bool = True) -> Pretrained:
    """Load a Hugging Face model directory (config.json + safetensors weights).

    Args:
      path: a directory with `config.json`, `model.safetensors` or a sharded
        `model.safetensors.index.json`, optionally `tokenizer.json`, and for a
        sentence-transformers model `modules.json` + `1_Pooling/config.json`.
      dtype: the compute dtype (`cfg.dtype`: "float32", "bfloat16", "float16"); None
        keeps float32. Parameters are float32 whatever the checkpoint's dtype.
      mesh: place each parameter with the shardings `transformer_jax.sharding` gives it
        on this mesh (under `use_mesh`'s rules), tensor by tensor.
      tokenizer: False skips tokenizer.json (the result's `tokenizer` is then None), for a
        caller that needs the weights only (fine-tuning on its own tokens): parsing it is
        a good part of the load of a small model.

    Raises:
      ValueError: a missing directory or file, an unsupported model_type, architecture
        or config option (named), a malformed or truncated safetensors file, a checkpoint
        tensor the model does not have, a parameter no tensor fills, or a tensor of the
        wrong shape (each named).
    """
    path = os.fspath(path)
    if not isinstance(tokenizer, bool):
        raise TypeError(f"tokenizer must be a bool (whether to load tokenizer.json), got {tokenizer!r}")
    if not os.path.isdir(path):
        raise ValueError(f"path={path!r} is not a directory")
    hf = _read_json(os.path.join(path, CONFIG_FILE))
    family = _family(hf.get("model_type"))
    pooling = read_pooling(path)
    cfg, kind = family.from_hf(hf, pooling is not None)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
        cfg = dataclasses.replace(cfg, dtype=dtype)
    model = _build(kind, cfg, hf)
    loaded = None
    if tokenizer:  # before the weights: a bad tokenizer.json fails the load early
        loaded = HFTokenizer.from_directory(path, hf, _max_length(path, cfg))
    params = _load_params(path, family, cfg, kind, model, mesh)
    return Pretrained(model, params, loaded, cfg, pooling, hf)


def _family(model_type: Any):
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; transformer_jax loads {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _max_length(path: str, cfg: ModelConfig) -> int:
    """The longest input the model takes: sentence-transformers' max_seq_length, the
    tokenizer's model_max_length, or the position table's length."""
    for file, key in (("sentence_bert_config.json", "max_seq_length"),
                      ("tokenizer_config.json", "model_max_length")):
        full = os.path.join(path, file)
        if os.path.isfile(full):
            value = _read_json(full).get(key)
            if isinstance(value, int) and 0 < value <= cfg.max_len:
                return value
    return cfg.max_len


def abstract_params(model: nn.Module) -> Any:
    """The model's parameters as boxed ShapeDtypeStructs (no memory allocated)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)  # (a classifier's init needs no labels)
    args = (tokens, tokens) if isinstance(model, models.EncoderDecoder) else (tokens,)
    return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def unboxed(tree: Any) -> Any:
    """`tree` with every `nn.Partitioned` box replaced by its value. (`nn.unbox` would also
    apply a sharding constraint under an active mesh, which abstract shapes cannot take.)"""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def _check_table(table: list[Entry], shapes: dict[tuple, tuple]) -> None:
    filled = [p for e in table for p in e.paths]
    if sorted(filled) != sorted(shapes):  # the table is ours: a mismatch is a bug here
        raise RuntimeError(
            f"internal: the key table does not fill the model's parameters exactly "
            f"(unfilled {sorted(set(shapes) - set(filled))[:3]}, unknown {sorted(set(filled) - set(shapes))[:3]})")


def _load_params(path: str, family, cfg: ModelConfig, kind: str, model: nn.Module, mesh) -> dict:
    source = TensorSource(path)
    table = family.entries(cfg, kind, *_classes(model))
    names = {}
    for key in source.infos:
        canonical = family.normalize_key(key, kind)
        if canonical in names:
            raise ValueError(f"{path!r} holds the tensor {canonical!r} twice (as {names[canonical]!r} and {key!r})")
        names[canonical] = key
    wanted = {e.key for e in table}
    ignorable = lambda k: bool(family.IGNORED.match(k)) or (cfg.tie_embeddings and k in family.TIED)  # noqa: E731
    unexpected = sorted(k for k in names if k not in wanted and not ignorable(k))
    if unexpected:
        raise ValueError(
            f"{path!r} holds tensors the {type(model).__name__} built from its config.json does "
            f"not have: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    missing = [e.key for e in table if e.key not in names]
    if missing:
        raise ValueError(
            f"{path!r} lacks tensors that parameters of the {type(model).__name__} need: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for e in table:
        info = source.infos[names[e.key]]
        if info.shape != e.shape:
            raise ValueError(f"tensor {names[e.key]!r} in {info.file!r} has shape {list(info.shape)}, "
                             f"expected {list(e.shape)} from config.json")
        if info.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {names[e.key]!r} in {info.file!r} has dtype {info.dtype}, expected a float")

    # The tables fill every parameter with its shape (checked by the tests through
    # save_pretrained, which compares against the model's own shapes), so the model is
    # traced for its shapes only when a mesh needs the logical axes for the shardings.
    tensors = [(e, source.infos[names[e.key]]) for e in table]
    if mesh is None and jax.default_backend() == "cpu":
        return traverse_util.unflatten_dict(_place_on_cpu(tensors, source))
    shardings: dict = {}
    if mesh is not None:
        from transformer_jax.sharding import state_shardings

        abstract = abstract_params(model)
        shapes = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(unboxed(abstract)).items()}
        _check_table(table, shapes)
        shardings = traverse_util.flatten_dict(state_shardings(abstract, mesh))
    scratch, flat = _Scratch(source), {}
    allocate = lambda shape: host_empty(shape, np.float32)  # noqa: E731
    for e, info in tensors:  # each host copy is freed once it is on the device(s)
        mapped = source.view(info)
        for p, host in zip(e.paths, _host_values(e, info, mapped, e.load(mapped), source, scratch, allocate)):
            flat[p] = jax.device_put(host, shardings.get(p))
    return traverse_util.unflatten_dict(flat)


def _aliasable(view: np.ndarray) -> bool:
    """Whether `view` (of a file's map) can be a CPU parameter as it is: float32, C order,
    `ALIGNMENT`-aligned (what device_put aliases rather than copies)."""
    return (view.dtype == np.float32 and view.flags.c_contiguous
            and view.__array_interface__["data"][0] % ALIGNMENT == 0)


def _same_bytes(mapped: np.ndarray, views: tuple[np.ndarray, ...]) -> bool:
    """Whether `views` (an entry's transform of the tensor `mapped`) is one float32 array
    holding the tensor's bytes in their order: the same layout or a reshape."""
    return (len(views) == 1 and views[0].dtype == np.float32 and views[0].flags.c_contiguous
            and views[0].size == mapped.size
            and views[0].__array_interface__["data"][0] == mapped.__array_interface__["data"][0])


class _Scratch:
    """One reused buffer that tensors needing a conversion are read into."""

    def __init__(self, source: TensorSource):
        self._source, self._buffer = source, np.empty(0, np.uint8)

    def read(self, info: TensorInfo) -> np.ndarray:
        nbytes = info.end - info.begin
        if self._buffer.size < nbytes:
            self._buffer = host_empty((nbytes,), np.uint8)
        return self._source.read_into(info, self._buffer[:nbytes].view(info.dtype).reshape(info.shape))


def _host_values(entry: Entry, info: TensorInfo, mapped: np.ndarray, views: tuple[np.ndarray, ...],
                 source: TensorSource, scratch: _Scratch,
                 allocate: Callable[[tuple[int, ...]], np.ndarray]) -> tuple[np.ndarray, ...]:
    """The float32 host arrays of the parameters `entry` fills from the tensor `info`;
    `mapped`: its view of the file's map, `views`: `entry.load(mapped)` (only their layout
    is used).

    A float32 tensor whose parameter has its bytes in the same order (same layout, or a
    reshape) is that view itself where the map places it `ALIGNMENT`-aligned (on CPU
    device_put aliases it: nothing is read now), else it is read straight into an array
    from `allocate(shape)`. Any other tensor (a transpose, GPT-2's fused q/k/v, another
    dtype) is read into the reused scratch buffer and converted by one (strided) copy
    into each parameter's array. Reads go through the page cache (plain reads), so no
    page of the file stays in the resident set beside the copy made of it.
    """
    if _same_bytes(mapped, views):
        if _aliasable(views[0]):
            return views
        return (source.read_into(info, allocate(views[0].shape)),)
    out = []
    for view in entry.load(scratch.read(info)):
        host = allocate(view.shape)
        np.copyto(host, view, casting="same_kind")  # bf16/f16/f64 checkpoints: parameters are float32
        out.append(host)
    return tuple(out)


def _place_on_cpu(tensors: list[tuple[Entry, TensorInfo]], source: TensorSource) -> dict:
    """The CPU parameters that `tensors` fill, placed by one device_put (which aliases
    every host array: no copy).

    The arrays `_host_values` allocates are slots of one arena, a single page-aligned
    allocation whose pages are faulted in by one call (`host_empty`): one allocation per
    parameter cost more than the copies into them. The arena lives as long as any
    parameter in it; the rest of the parameters are views of the file's map.
    """
    planned, total = [], 0  # (entry, tensor, its map view, entry's views); the arena's bytes, slots aligned
    for e, info in tensors:
        mapped = source.view(info)
        views = e.load(mapped)
        planned.append((e, info, mapped, views))
        if not (_same_bytes(mapped, views) and _aliasable(views[0])):
            total += sum(-(-v.size * 4 // ALIGNMENT) * ALIGNMENT for v in views)
    arena, offset = host_empty((total,), np.uint8), 0

    def take(shape: tuple[int, ...]) -> np.ndarray:
        nonlocal offset
        slot = arena[offset:offset + math.prod(shape) * 4].view(np.float32).reshape(shape)
        offset += -(-slot.nbytes // ALIGNMENT) * ALIGNMENT
        return slot

    scratch = _Scratch(source)
    paths, hosts = [], []
    for e, info, mapped, views in planned:
        paths += e.paths
        hosts += _host_values(e, info, mapped, views, source, scratch, take)
    if offset != arena.size:  # the two passes decide alike: a mismatch is a bug here
        raise RuntimeError(f"internal: {offset} of the arena's {arena.size} bytes were used")
    return dict(zip(paths, jax.device_put(hosts)))


def family_for(model: nn.Module):
    """The checkpoint family that holds `model` (by kind and architecture)."""
    cfg = model.cfg
    if isinstance(model, models.SequenceClassifier):
        if model.pooling != "first" or not model.pooler:
            raise ValueError("a SequenceClassifier is saved as BertForSequenceClassification, which "
                             f"needs pooling='first' and pooler=True, got {model.pooling!r}, {model.pooler}")
        return bert
    if isinstance(model, (models.Encoder, models.MaskedLM)):
        return bert
    if isinstance(model, models.EncoderDecoder):
        return marian
    if isinstance(model, models.DecoderLM):
        return gpt2 if cfg.norm == "layernorm" else llama
    raise TypeError("model must be a DecoderLM, Encoder, MaskedLM, SequenceClassifier or EncoderDecoder, "
                    f"got {type(model).__name__}")


def save_pretrained(path: str | os.PathLike, model: nn.Module, params: Any,
                    tokenizer: HFTokenizer | None = None, *, pooling: Pooling | None = None,
                    token_ids: dict[str, int] | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write `model` and `params` as a Hugging Face directory transformers can load.

    Writes config.json and the weights (float32, one tensor at a time): model.safetensors,
    or where they exceed `max_shard_size` (bytes, or a string such as "2GB", "500MB";
    default "50GB" as transformers) shards model-00001-of-0000N.safetensors with their
    index model.safetensors.index.json, as transformers shards (a tensor larger than the
    limit gets a shard of its own). Also writes tokenizer.json + tokenizer_config.json
    when `tokenizer` is given, and modules.json + 1_Pooling/config.json when `pooling` is.
    A model with `fused_qkv` is saved as a gpt2 with its `qkv` kernels as `c_attn`; the
    other formats keep query, key and value apart, so its `qkv` is split for them (the
    directory then loads as the same model with `fused_qkv=False`). Other files in `path`
    stay. Over a previous save, every file is written under a temporary name first (a
    failure meanwhile leaves the previous save whole), then put in place with config.json
    removed first and renamed in last: a crash amid those renames leaves no config.json (loading fails with an error naming it), never the new
    weights beside the old config; the previous save's weight files the new one does not
    use are removed (see `safetensors_io.StagedCheckpoint.commit`).
    `token_ids` (e.g. {"pad_token_id": 58100, "decoder_start_token_id": 58100}) go into
    config.json as they are; the tokenizer's special ids fill the ones not given.
    Marian needs `pad_token_id` (transformers refuses a Marian config without a valid one).
    The families: Encoder / MaskedLM / SequenceClassifier (pooling "first", pooler) -> bert, DecoderLM with LayerNorm -> gpt2, with
    RMSNorm -> llama (qwen2 with q/k/v biases, mistral with a sliding window),
    EncoderDecoder -> marian. Returns `path`.

    Raises:
      ValueError: a model option the family's format cannot hold (named), params that
        do not match the model, or a malformed `max_shard_size`.
    """
    path = os.fspath(path)
    parse_size(max_shard_size)  # before anything is written
    family = family_for(model)
    kind = next(k for k, c in MODEL_CLASSES.items() if type(model) is c)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    if model.cfg.fused_qkv and family is not gpt2:  # these formats keep q/k/v apart: same model, split
        model = model.clone(cfg=dataclasses.replace(model.cfg, fused_qkv=False))
        params = split_qkv(unboxed(params))
    cfg = model.cfg
    family.check_config(cfg, kind)
    flat = traverse_util.flatten_dict(unboxed(params))
    shapes = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(unboxed(abstract_params(model))).items()}
    got = {p: tuple(np.shape(v)) for p, v in flat.items()}
    if got != shapes:
        wrong = sorted(set(shapes) ^ set(got)) or sorted(p for p in shapes if shapes[p] != got[p])
        raise ValueError(f"params do not match the model built from its config: e.g. {'/'.join(wrong[0])}")
    table = family.entries(cfg, kind, *_classes(model))
    hf = {**family.to_hf(cfg, kind, *_classes(model)), "torch_dtype": "float32", "dtype": "float32", **(token_ids or {})}
    files = {}  # name (relative to path) -> text, written beside the weights
    if tokenizer is not None:
        for name, value in (("pad_token_id", tokenizer.pad_id), ("bos_token_id", tokenizer.bos_id),
                            ("eos_token_id", tokenizer.eos_id)):
            if value >= 0:
                hf.setdefault(name, value)
        files.update(tokenizer.files() if isinstance(tokenizer, HFTokenizer) else {TOKENIZER_FILE: tokenizer.to_json()})
    if pooling is not None:
        files.update(pooling_files(pooling, cfg.d_model))
    files[CONFIG_FILE] = json.dumps(hf, indent=2)
    for directory in [path, *(os.path.join(path, d) for d in (pooling_directories(pooling) if pooling else ()))]:
        os.makedirs(directory, exist_ok=True)
    tensors = [(e.key, e.shape, np.float32,
                lambda e=e: e.save(*(np.asarray(jax.device_get(flat[p]), np.float32) for p in e.paths)))
               for e in table]
    # Everything is written under temporary names first: a failure meanwhile leaves the
    # previous save as it was. Then config.json goes first out and last in, so a crash in
    # the renames between leaves a directory without config.json, which from_pretrained and
    # transformers refuse with an error, never new weights with the old config (or the reverse).
    staged, temps = stage_checkpoint(path, tensors, max_shard_size), {}
    try:
        for name, text in files.items():
            temps[name] = write_tmp_text(os.path.join(path, name), text)
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            os.remove(os.path.join(path, CONFIG_FILE))
        staged.commit()
        for name in sorted(files, key=lambda n: n == CONFIG_FILE):  # config.json last
            os.replace(temps.pop(name), os.path.join(path, name))
    finally:
        staged.discard()
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is missing")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} does not hold a JSON object")
    return data
