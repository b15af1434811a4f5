"""Export the router to ONNX with torch.onnx and check it against PyTorch.

optimum's exporters know the stock Hugging Face heads, not eq. (10)'s
σ(Wᵀ[h; L_p] + b) with its extra length input, so both the trained router
and a ready-made classifier go through ``torch.onnx.export`` (TorchScript
path, dynamic batch and sequence axes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from device_runtime.routing.bundle import batch_arrays, encode_turn, pad_id_of
from export.config import ExportConfig

log = logging.getLogger(__name__)


class ExportMismatchError(RuntimeError):
    """The exported ONNX model disagrees with PyTorch beyond the tolerance."""

    def __init__(self, max_abs_diff: float, atol: float, path: Path) -> None:
        super().__init__(
            f"{path.name}: ONNX and PyTorch scores differ by up to {max_abs_diff:.3g} (atol {atol:.3g})"
        )
        self.max_abs_diff = max_abs_diff
        self.atol = atol


def model_inputs(has_lp: bool, uses_types: bool) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if uses_types:
        names.append("token_type_ids")
    if has_lp:
        names.append("lp")
    return names


def sample_feeds(tokenizer, turns: Sequence[tuple[str, Sequence[dict]]], max_length: int,
                 names: Sequence[str], lp_feature=None) -> dict[str, np.ndarray]:
    """Padded numpy feeds for ``turns`` (the same code path as the device)."""
    encs = [encode_turn(tokenizer, p, c, max_length) for p, c in turns]
    arrays = batch_arrays(encs, pad_id_of(tokenizer))
    feeds = {k: arrays[k] for k in names if k in arrays}
    if "lp" in names:
        feeds["lp"] = np.asarray([[lp_feature.value(p)] for p, _ in turns], dtype=np.float32)
    return feeds


def export_onnx(module, names: Sequence[str], feeds: dict[str, np.ndarray], path: Path,
                config: ExportConfig) -> Path:
    """Write ``module`` (inputs ``names`` -> p [batch]) as ONNX at ``path``."""
    import torch

    module.eval()
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    dynamic = {n: ({0: "batch"} if n == "lp" else {0: "batch", 1: "sequence"}) for n in names}
    dynamic["p"] = {0: "batch"}
    path = Path(path)
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(names),
            output_names=["p"],
            dynamic_axes=dynamic,
            opset_version=config.opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return path


def torch_scores(module, names: Sequence[str], feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in names)).numpy().reshape(-1)


def onnx_scores(path: Path, feeds: dict[str, np.ndarray], threads: int = 1) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["p"], feeds)[0]).reshape(-1)


def check_export(module, names: Sequence[str], feeds: dict[str, np.ndarray], path: Path,
                 atol: float) -> float:
    """Max |p_onnx - p_torch| on ``feeds``; raises :class:`ExportMismatchError` above ``atol``."""
    diff = float(np.max(np.abs(onnx_scores(path, feeds) - torch_scores(module, names, feeds))))
    if not np.isfinite(diff) or diff > atol:
        raise ExportMismatchError(diff, atol, Path(path))
    log.info("%s matches PyTorch: max |diff| %.2e <= atol %.0e", Path(path).name, diff, atol)
    return diff
