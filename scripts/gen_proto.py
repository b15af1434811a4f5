"""Generate the Python stubs of the edge API from ``proto/**/*.proto``.

    python scripts/gen_proto.py           # (re)write the stubs next to the .proto files
    python scripts/gen_proto.py --check   # exit 1 if the committed stubs are stale

The proto tree mirrors the import path (``proto/edgeroute/v1/edge.proto`` ->
``edgeroute.v1.edge_pb2``), so generated imports work without patching.  The
stubs are committed for installs without grpcio-tools; ``--check`` (and
``tests/test_proto.py``) guard that they match what the generator produces.
Never edit the stubs by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` file under ``proto_root``, relative to it."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on every ``.proto`` file; return the generated files (relative)."""
    from grpc_tools import protoc  # dev dependency, needed only here

    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc resolves well-known imports (google/protobuf/*.proto) from the
    # include directory that ships inside grpc_tools.
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(f) for f in files],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return sorted(
        p.relative_to(out_dir)
        for p in out_dir.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def stale_stubs(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files that differ from (or are missing in) ``proto_root``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        stale = [
            str(rel)
            for rel in fresh
            if not (proto_root / rel).is_file()
            or not filecmp.cmp(Path(tmp) / rel, proto_root / rel, shallow=False)
        ]
    committed = {
        p.relative_to(proto_root)
        for p in proto_root.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }
    # A stub whose .proto was deleted is stale too.
    stale += [f"{rel} (no longer generated)" for rel in sorted(committed - set(fresh))]
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the stubs are up to date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print("stale generated stubs (run python scripts/gen_proto.py):", file=sys.stderr)
            for name in stale:
                print(f"  {name}", file=sys.stderr)
            return 1
        print("generated stubs are up to date", file=sys.stderr)
        return 0
    for rel in generate(PROTO_ROOT):
        print(f"wrote proto/{rel}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
