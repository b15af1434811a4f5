"""INT8 dynamic quantization of the exported router (onnxruntime.quantization)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.config import QuantizationConfig

log = logging.getLogger(__name__)


def quantize(fp32_path: Path, int8_path: Path, config: QuantizationConfig) -> Path:
    """``quantize_dynamic``: INT8 weights, activations quantized per call at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        model_input=str(fp32_path),
        model_output=str(int8_path),
        weight_type=getattr(QuantType, config.weight_type),
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        op_types_to_quantize=list(config.op_types),
    )
    return Path(int8_path)


def agreement(fp32: np.ndarray, int8: np.ndarray) -> dict[str, float]:
    """How closely INT8 scores follow FP32: max/mean |diff| and Spearman rank correlation."""
    fp32, int8 = np.asarray(fp32, float), np.asarray(int8, float)
    diff = np.abs(fp32 - int8)

    def ranks(x):
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        return r

    rho = float(np.corrcoef(ranks(fp32), ranks(int8))[0, 1]) if len(fp32) > 1 else 1.0
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "spearman": rho}
