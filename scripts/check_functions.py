"""List functions longer than the limit (default 80 lines, decorators and
docstring included) in the project's Python code; exit 1 if there are any.

    python scripts/check_functions.py [--max 80] [PATH ...]

Generated gRPC stubs are skipped.  ``tests/test_function_length.py`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ("device_runtime", "edge_service", "export", "netlab", "scripts", "proto")
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def long_functions(path: Path, limit: int) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of each function over ``limit`` lines in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    length = child.end_lineno - first + 1
                    if length > limit:
                        found.append((name, first, length))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def python_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        candidates = [p] if p.is_file() else sorted(p.rglob("*.py"))
        files += [f for f in candidates if not f.name.endswith(GENERATED)]
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max", type=int, default=80, help="longest function allowed, in lines")
    ap.add_argument("paths", nargs="*", type=Path, help="files or directories (default: the project's code)")
    args = ap.parse_args(argv)
    paths = args.paths or [ROOT / d for d in DEFAULT_PATHS]
    bad = []
    for f in python_files(paths):
        for name, line, length in long_functions(f, args.max):
            rel = f.resolve().relative_to(ROOT) if f.resolve().is_relative_to(ROOT) else f
            bad.append(f"{rel}:{line}: {name} is {length} lines (max {args.max})")
    print("\n".join(bad) if bad else f"no function over {args.max} lines", file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
