"""Per-query response-length prediction: L̄_r^s and L̄_r^e for each prompt (issue 5, item 3).

The paper plugs one per-benchmark average L̄_r into eqs. (3), (5)-(7) and so
into the fused score of eq. (11).  This module predicts L_r per query from
cheap prompt features with a ridge regression of log(1 + words), one model
per target (device, edge).  Pure numpy; the fitted model is a small JSON.

Why the log target and the smearing factor: response lengths are skewed and
multiplicative in the prompt's size, so the log fits better; but latency is
linear in L_r (eqs. 5-7), so the decision needs the *mean* length, not the
median that exp(ŷ) estimates.  Duan's smearing factor, the train mean of
exp(residual), turns one into the other.

The simulator's use of these lengths is :mod:`device_runtime.sim.length_plan`;
fitting on a trace's train split and reporting R²/MAE on its val split against
the per-benchmark average baselines is :mod:`device_runtime.cli.response_length`::

    python -m device_runtime.cli.response_length --data-dir ../shared/data/routellm [--out M.json] [--json]
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from device_runtime.core.flags import flag
from device_runtime.routing.cost_model import ResponseLengths

#: Bump when the feature set or the JSON layout changes.
FORMAT_VERSION = 1
FEATURES: tuple[str, ...] = (
    "log1p_prompt_words",
    "log1p_chars",
    "log1p_digits",
    "log1p_numbers",
    "sentences",
    "question_marks",
    "log1p_max_number",
)
#: Prompts longer than this are cut before featurising (bounded work per query).
MAX_PROMPT_CHARS = 100_000

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


class LengthModelError(ValueError):
    """The length model cannot be fitted, loaded or applied to this input."""


def prompt_features(prompt: str) -> np.ndarray:
    """The feature vector of one prompt, in the order of :data:`FEATURES`."""
    if not isinstance(prompt, str):
        raise LengthModelError(f"prompt must be a string, got {type(prompt).__name__}")
    text = prompt[:MAX_PROMPT_CHARS]
    numbers = _NUMBER.findall(text)
    max_number = 0.0
    for n in numbers:
        try:
            max_number = max(max_number, float(n.replace(",", "")))
        except ValueError:  # "1.2.3": not one number; its digits still count
            pass
    return np.array(
        [
            math.log1p(len(text.split())),
            math.log1p(len(text)),
            math.log1p(sum(c.isdigit() for c in text)),
            math.log1p(len(numbers)),
            float(len(_SENTENCE_END.findall(text))),
            float(text.count("?")),
            math.log1p(min(max_number, 1e12)),
        ],
        dtype=float,
    )


def _feature_matrix(prompts: Sequence[str]) -> np.ndarray:
    return np.stack([prompt_features(p) for p in prompts]) if prompts else np.empty((0, len(FEATURES)))


@dataclass(frozen=True)
class FitSettings:
    """Settings of :func:`fit`."""

    #: Ridge penalty on the standardized coefficients (the intercept is not penalized).
    l2: float = field(default=1.0, metadata=flag("ridge penalty"))
    #: Fewest training rows accepted.
    min_rows: int = field(default=3, metadata=flag("fewest training rows", cli=False))

    def __post_init__(self) -> None:
        if not isinstance(self.l2, (int, float)) or math.isnan(self.l2) or self.l2 < 0:
            raise ValueError(f"l2 must be a non-negative number, got {self.l2!r}")
        if not isinstance(self.min_rows, int) or self.min_rows < 2:
            raise ValueError(f"min_rows must be an integer >= 2, got {self.min_rows!r}")


@dataclass(frozen=True)
class TargetFit:
    """One target's regression: log1p(words) ≈ intercept + coef · standardized features."""

    intercept: float
    coef: tuple[float, ...]
    #: Duan's smearing factor: E[exp(residual)] on the train rows.
    smearing: float

    def __post_init__(self) -> None:
        if len(self.coef) != len(FEATURES):
            raise LengthModelError(f"expected {len(FEATURES)} coefficients, got {len(self.coef)}")
        values = (self.intercept, self.smearing, *self.coef)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise LengthModelError("coefficients must be finite numbers")
        if self.smearing <= 0:
            raise LengthModelError(f"smearing must be > 0, got {self.smearing!r}")

    def predict(self, z: np.ndarray) -> np.ndarray:
        """Expected words for standardized features ``z`` (n × d)."""
        log_words = self.intercept + z @ np.asarray(self.coef)
        # Clip before exp: an extreme prompt must not overflow to inf seconds.
        return np.maximum(np.exp(np.clip(log_words, 0.0, 12.0)) * self.smearing - 1.0, 0.0)


@dataclass(frozen=True)
class LengthModel:
    """Per-query L̄_r^s and L̄_r^e (words, as the paper counts tokens) from the prompt."""

    benchmark: str
    feature_mean: tuple[float, ...]
    feature_scale: tuple[float, ...]
    device: TargetFit
    edge: TargetFit
    n_train: int
    l2: float

    def __post_init__(self) -> None:
        for name in ("feature_mean", "feature_scale"):
            v = getattr(self, name)
            if len(v) != len(FEATURES) or not all(math.isfinite(x) for x in v):
                raise LengthModelError(f"{name} must be {len(FEATURES)} finite numbers")
        if any(s <= 0 for s in self.feature_scale):
            raise LengthModelError("feature_scale must be positive")
        if not isinstance(self.n_train, int) or self.n_train < 1:
            raise LengthModelError(f"n_train must be a positive integer, got {self.n_train!r}")

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        return (x - np.asarray(self.feature_mean)) / np.asarray(self.feature_scale)

    def predict_many(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(device words, edge words) for each prompt."""
        z = self._standardize(_feature_matrix(list(prompts)))
        return self.device.predict(z), self.edge.predict(z)

    def predict(self, prompt: str) -> ResponseLengths:
        """L̄_r for one prompt, ready for ``TurnInputs(response_device=..., response_edge=...)``."""
        dev, edge = self.predict_many([prompt])
        return ResponseLengths(device=float(dev[0]), edge=float(edge[0]))

    def to_dict(self) -> dict:
        def target(t: TargetFit) -> dict:
            return {"intercept": t.intercept, "coef": list(t.coef), "smearing": t.smearing}

        return {
            "format_version": FORMAT_VERSION,
            "kind": "ridge-log1p-words",
            "benchmark": self.benchmark,
            "features": list(FEATURES),
            "feature_mean": list(self.feature_mean),
            "feature_scale": list(self.feature_scale),
            "device": target(self.device),
            "edge": target(self.edge),
            "n_train": self.n_train,
            "l2": self.l2,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LengthModel":
        if not isinstance(data, dict):
            raise LengthModelError("length model JSON must be an object")
        if data.get("format_version") != FORMAT_VERSION:
            raise LengthModelError(
                f"unsupported length model format_version {data.get('format_version')!r} "
                f"(expected {FORMAT_VERSION})"
            )
        if tuple(data.get("features", ())) != FEATURES:
            raise LengthModelError(f"length model features {data.get('features')!r} do not match {list(FEATURES)}")
        try:
            return cls(
                benchmark=str(data["benchmark"]),
                feature_mean=tuple(float(x) for x in data["feature_mean"]),
                feature_scale=tuple(float(x) for x in data["feature_scale"]),
                device=TargetFit(
                    float(data["device"]["intercept"]),
                    tuple(float(x) for x in data["device"]["coef"]),
                    float(data["device"]["smearing"]),
                ),
                edge=TargetFit(
                    float(data["edge"]["intercept"]),
                    tuple(float(x) for x in data["edge"]["coef"]),
                    float(data["edge"]["smearing"]),
                ),
                n_train=int(data["n_train"]),
                l2=float(data["l2"]),
            )
        except (KeyError, TypeError) as exc:
            raise LengthModelError(f"malformed length model JSON: {exc!r}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LengthModel":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LengthModelError(f"length model {str(path)!r} not found") from None
        except OSError as exc:
            raise LengthModelError(f"cannot read length model {str(path)!r}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LengthModelError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except LengthModelError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise LengthModelError(f"{path}: not a length model ({type(exc).__name__}: {exc})") from None


def _check_words(name: str, values: Sequence[float], n: int) -> np.ndarray:
    y = np.asarray(values, dtype=float)
    if y.shape != (n,):
        raise LengthModelError(f"{name}: expected {n} lengths, got shape {y.shape}")
    if not np.all(np.isfinite(y)) or np.any(y < 0):
        raise LengthModelError(f"{name}: lengths must be finite and non-negative")
    return y


def _ridge(z: np.ndarray, y: np.ndarray, l2: float) -> TargetFit:
    target = np.log1p(y)
    intercept0 = float(target.mean())
    # Centered target + standardized features: the intercept is the mean and is not penalized.
    a = z.T @ z + l2 * np.eye(z.shape[1])
    coef = np.linalg.solve(a, z.T @ (target - intercept0))
    resid = target - (intercept0 + z @ coef)
    return TargetFit(intercept0, tuple(float(c) for c in coef), float(np.mean(np.exp(resid))))


def fit(
    prompts: Sequence[str],
    words_device: Sequence[float],
    words_edge: Sequence[float],
    *,
    benchmark: str = "gsm8k",
    settings: FitSettings = FitSettings(),
) -> LengthModel:
    """Fit both targets' regressions on (prompt, response words) rows."""
    prompts = list(prompts)
    n = len(prompts)
    if n < settings.min_rows:
        raise LengthModelError(f"need at least {settings.min_rows} rows to fit, got {n}")
    y_dev = _check_words("words_device", words_device, n)
    y_edge = _check_words("words_edge", words_edge, n)
    x = _feature_matrix(prompts)
    mean = x.mean(axis=0)
    # A constant feature (scale 0) gets scale 1: its standardized value is 0 and its weight irrelevant.
    scale = np.where(x.std(axis=0) > 1e-12, x.std(axis=0), 1.0)
    z = (x - mean) / scale
    return LengthModel(
        benchmark=benchmark,
        feature_mean=tuple(float(v) for v in mean),
        feature_scale=tuple(float(v) for v in scale),
        device=_ridge(z, y_dev, settings.l2),
        edge=_ridge(z, y_edge, settings.l2),
        n_train=n,
        l2=float(settings.l2),
    )


def length_rows(dialogues, split: str | None = None, val_fraction: float = 0.2):
    """(prompts, device words, edge words) of the turns that carry both lengths.

    ``split`` ("train"/"val") keeps turns whose dialogue's first prompt falls in
    that hash split (:func:`device_runtime.sim.traces.split_of`), as ``simulate --split`` does.
    """
    from device_runtime.sim.traces import split_of

    prompts, dev, edge = [], [], []
    for d in dialogues:
        if split is not None and split_of(d.turns[0].prompt, val_fraction) != split:
            continue
        for t in d.turns:
            if t.response_words_device is None or t.response_words_edge is None:
                continue
            prompts.append(t.prompt)
            dev.append(t.response_words_device)
            edge.append(t.response_words_edge)
    return prompts, dev, edge


def fit_trace(
    dialogues,
    *,
    benchmark: str,
    val_fraction: float = 0.2,
    settings: FitSettings = FitSettings(),
) -> LengthModel:
    """Fit on the train split of a loaded trace (turns with recorded responses only)."""
    prompts, dev, edge = length_rows(dialogues, "train", val_fraction)
    if not prompts:
        raise LengthModelError(
            f"{benchmark}: the trace has no per-query response lengths on its train split "
            "(only GSM8K's responses file carries them)"
        )
    return fit(prompts, dev, edge, benchmark=benchmark, settings=settings)


def regression_scores(y: Sequence[float], y_hat: Sequence[float]) -> dict[str, float]:
    """R² and mean absolute error (words) of predictions ``y_hat`` of ``y``."""
    y, y_hat = np.asarray(y, float), np.asarray(y_hat, float)
    if y.size == 0 or y.shape != y_hat.shape:
        raise LengthModelError("need equally many, and at least one, true and predicted lengths")
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - y_hat) ** 2).sum())
    return {
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "mae": float(np.abs(y - y_hat).mean()),
    }


def evaluate(model: LengthModel, dialogues, *, val_fraction: float = 0.2) -> dict:
    """R²/MAE on the val split: the model, the train-split mean, and the paper's Table II average."""
    from device_runtime.routing.cost_model import PAPER_RESPONSE_LENGTHS

    _, tr_dev, tr_edge = length_rows(dialogues, "train", val_fraction)
    prompts, dev, edge = length_rows(dialogues, "val", val_fraction)
    if not prompts or not tr_dev:
        raise LengthModelError("need per-query lengths on both the train and the val split")
    p_dev, p_edge = model.predict_many(prompts)
    paper = PAPER_RESPONSE_LENGTHS.get(model.benchmark)
    out: dict = {"n_train": len(tr_dev), "n_val": len(prompts)}
    for target, y, pred, train_mean in (
        ("device", dev, p_dev, float(np.mean(tr_dev))),
        ("edge", edge, p_edge, float(np.mean(tr_edge))),
    ):
        rows = {
            "predicted": regression_scores(y, pred),
            "train_mean": regression_scores(y, np.full(len(y), train_mean)),
        }
        if paper is not None:
            avg = paper.device if target == "device" else paper.edge
            rows["paper_average"] = regression_scores(y, np.full(len(y), avg))
        out[target] = {"val_mean_words": float(np.mean(y)), "train_mean_words": train_mean, **rows}
    return out
