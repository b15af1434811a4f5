"""``edgeroute export``: train the BERT router (eq. 10), export it to ONNX, quantize it to INT8.

    edgeroute export --out BUNDLE_DIR [--base PATH] [--data-dir DIR ...]
    edgeroute export --from-classifier PATH --out BUNDLE_DIR [--positive-label K]

The bundle holds model.onnx (INT8), model_fp32.onnx, tokenizer.json,
manifest.json and pytorch/ (the trained checkpoint, for the benchmark).
``--ship DIR`` also copies the device part (INT8 model, tokenizer, manifest)
to DIR, e.g. device_runtime/bundles/default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from device_runtime.core.flags import add_flags, from_args
from export.config import POOLINGS, ExportConfig, TrainConfig

#: Tokens per turn of a ``--from-classifier`` export when --max-length is not given.
CLASSIFIER_MAX_LENGTH = 512


def _default(name: str):
    """A TrainConfig field's default (for the flags whose syntax differs from the field)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


def _grid(text: str) -> tuple[float, ...]:
    """``--head-l2``: 'none' -> () (AdamW head), else comma-separated penalties."""
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--head-l2 must be comma-separated numbers or 'none', got {text!r}") from None
    if not values:
        raise ValueError("--head-l2 is empty (use 'none' for the AdamW head)")
    return values


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the parsed flags: those made by :func:`add_flags` as they
    are, the others converted from their command-line syntax."""
    return from_args(
        TrainConfig, args,
        base=Path(args.base) if args.base else None,
        data_dirs=tuple(Path(d) for d in args.data_dir or ()),
        benchmarks=tuple(b.strip() for b in args.benchmarks.split(",") if b.strip()),
        max_length=_default("max_length") if args.max_length is None else args.max_length,
        encoder_layers=args.encoder_layers or None,
        head_l2_grid=_grid(args.head_l2),
        neighbor_groups=not args.no_neighbor_groups,
        progress=not args.no_progress,
    )


def _run(args: argparse.Namespace) -> int:
    import os

    # Nothing may be fetched at run time: models come from local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from export.config import ConfigError
    from export.onnx_export import ExportMismatchError
    from export.pipeline import export_classifier, export_trained, ship
    from export.train import TrainError

    try:
        export_config = from_args(ExportConfig, args)
        if args.quantize_only:
            from export.pipeline import requantize

            out = requantize(Path(args.out), threads=args.threads)
        elif args.from_classifier:
            out = export_classifier(
                Path(args.from_classifier), Path(args.out), positive_label=args.positive_label,
                max_length=CLASSIFIER_MAX_LENGTH if args.max_length is None else args.max_length,
                export_config=export_config, force=args.force,
            )
        else:
            out = export_trained(Path(args.out), _train_config(args), export_config, force=args.force)
        if args.ship:
            ship(out, Path(args.ship), force=True)
    except (ConfigError, TrainError, ExportMismatchError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"edgeroute export: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((out / "manifest.json").read_text())
    summary = {"bundle": str(out), "validation": manifest.get("validation", {})}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"bundle written to {out}", file=sys.stderr)
    return 0


def _train_flags(p: argparse.ArgumentParser) -> None:
    """The training options, in their --help order: TrainConfig's flag fields with
    its defaults and help texts; the options whose syntax differs from their field
    (comma lists, repeatable, negated, 0 for None) are added here, with defaults
    read from the class."""
    add_flags(p, TrainConfig, only=["base"])
    p.add_argument("--data-dir", action="append", help="RouteLLM-layout data directory (repeatable; "
                   "default ../shared/data/routellm)")
    p.add_argument("--benchmarks", default=",".join(_default("benchmarks")), help="comma-separated subsets to train on")
    add_flags(p, TrainConfig, only=["max_length"], defaults={"max_length": None}, help_suffix={
        "max_length": f" (default {_default('max_length')}; {CLASSIFIER_MAX_LENGTH} for --from-classifier)"
    })
    p.add_argument("--pooling", choices=POOLINGS, default=_default("pooling"))
    add_flags(p, TrainConfig, only=["normalize", "encoder_layers", "train_layers", "neighbor_smoothing",
                                    "neighbor_feature"])
    p.add_argument("--no-neighbor-groups", action="store_true",
                   help="leave out f(h), the benchmark shares among the k(h) neighbours, and f(h)*L_p")
    p.add_argument("--head-l2", default=",".join(f"{v:g}" for v in _default("head_l2_grid")), metavar="GRID",
                   help="comma-separated L2 penalties on the head's weights on h, chosen by "
                        f"{_default('head_cv_folds')}-fold CV on the training turns (one value: no CV; 'none': AdamW for --epochs) (default: %(default)s)")
    add_flags(p, TrainConfig, only=["epochs"], help_suffix={"epochs": " (default: %(default)s)"})
    p.add_argument("--seed", type=int, default=_default("seed"))
    add_flags(p, TrainConfig, only=["threads"])


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="train the BERT router and export it to ONNX (FP32 + INT8)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    _train_flags(p)
    add_flags(p, ExportConfig, only=["atol"])
    p.add_argument("--from-classifier", metavar="PATH",
                   help="export this Hugging Face sequence-classification checkpoint as is (no training)")
    p.add_argument("--positive-label", type=int, default=0,
                   help="with --from-classifier: p = P(label K) (default 0: RouteLLM's 'strong model wins')")
    p.add_argument("--quantize-only", action="store_true",
                   help="re-quantize the full export already in --out (no training) and refresh its INT8 metrics")
    p.add_argument("--ship", metavar="DIR", help="also copy model.onnx, tokenizer.json and manifest.json to DIR")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--json", action="store_true", help="print the validation summary as JSON on stdout")
    p.set_defaults(func=_run)
