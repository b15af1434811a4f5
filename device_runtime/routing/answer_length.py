"""Per-turn answer lengths for the live cost model: L_r^s and L_r^e of the
turn about to be routed, from its prompt and the run's answer cap.

The paper plugs one average L̄_r per benchmark into eqs. (5)-(7).  Live, one
average is wrong on most turns: a capped answer ("explain step by step") and a
short one ("thanks, that is all") differ by a factor of three, and the edge's
decode term is most of Tᵉ.  This model predicts each side's length from a few
cues of the prompt (its size, numbers, words that ask for a long or a short
answer, whether it follows earlier turns) with a ridge regression of
log(1 + tokens), one per side, fitted on answers the two models actually gave
(``scripts/collect_answer_lengths.py``, ``scripts/fit_answer_lengths.py``).

What the cost model needs is the *mean* of the capped length,
E[min(L_r, cap)] (latency is linear in it), not the median that exp(ŷ)
estimates: so the fit keeps quantiles of its residuals and a prediction
averages min(exp(ŷ + r) − 1, cap) over them.  Answers longer than the cap
the rows were collected with (``train_cap``) are known only to be that long,
so a larger cap is treated as ``train_cap``.

:class:`LiveLengths` corrects the model online, for a model pair or a
sampling it was not fitted on and for the conversation at hand: each side's
predictions are scaled by the shrunk geometric mean of actual/predicted over
this conversation's answers and the run's recent ones.

The simulator's length model (:mod:`device_runtime.sim.response_length`)
is another one on purpose: it predicts the RouteLLM traces' recorded answers
(GPT-4's and Mixtral's, in words, uncapped) for replaying those traces,
while this one predicts the live models' answers in device-SLM tokens under
the run's cap, and runs on the device (the routing layer; ``sim`` is not
imported by the runtime).

Pure numpy, no I/O but :meth:`AnswerLengthModel.load`/``save``.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from device_runtime.routing.cost_model import ResponseLengths

FORMAT_VERSION = 2
FEATURES: tuple[str, ...] = (
    "log1p_words",
    "log1p_numbers",
    "question_marks",
    "long_cues",
    "short_cues",
    "code_cues",
    "follow_up",
)
SIDES = ("device", "edge")
#: Prompts longer than this are cut before their cues are read (bounded work per turn).
MAX_PROMPT_CHARS = 20_000
#: Largest |log(actual/predicted)| one answer adds to the online correction (a factor of 3).
MAX_LOG_RATIO = math.log(3.0)
#: Residual quantiles kept per side (their midpoints: 2.5%, 7.5%, ... 97.5%).
N_QUANTILES = 20

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_LONG = re.compile(
    r"\b(explain|explanation|step[- ]by[- ]step|describe|detail(?:ed|s)?|elaborate|list|steps|"
    r"write|draft|essay|story|compare|analy[sz]e|discuss|summari[sz]e|plan|outline|why|how)\b",
    re.IGNORECASE,
)
_SHORT = re.compile(
    r"\b(one[- ](?:line|word|sentence)|single (?:line|word|sentence)|in (?:a|one) (?:word|sentence|line)|"
    r"brief(?:ly)?|short(?:ly)?|concise(?:ly)?|yes or no|just (?:the|a|one)|only (?:the|a|one))\b",
    re.IGNORECASE,
)
_CODE = re.compile(r"\b(code|function|python|program|script|sql|regex|class|implement)\b", re.IGNORECASE)


class AnswerLengthError(ValueError):
    """The model cannot be fitted, loaded or applied to this input."""


def turn_features(prompt: str, follow_up: bool) -> np.ndarray:
    """The features of one user turn, in the order of :data:`FEATURES`."""
    if not isinstance(prompt, str):
        raise AnswerLengthError(f"prompt must be a string, got {type(prompt).__name__}")
    text = prompt[:MAX_PROMPT_CHARS]
    return np.array([
        math.log1p(len(text.split())),
        math.log1p(len(_NUMBER.findall(text))),
        float(min(text.count("?"), 5)),
        float(min(len(_LONG.findall(text)), 5)),
        float(min(len(_SHORT.findall(text)), 3)),
        float(min(len(_CODE.findall(text)), 3)),
        1.0 if follow_up else 0.0,
    ])


@dataclass(frozen=True)
class SideFit:
    """One side's regression: log1p(tokens) ≈ intercept + coef · z, and its residual quantiles."""

    intercept: float
    coef: tuple[float, ...]
    residuals: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.coef) != len(FEATURES):
            raise AnswerLengthError(f"expected {len(FEATURES)} coefficients, got {len(self.coef)}")
        if not self.residuals:
            raise AnswerLengthError("residual quantiles must not be empty")
        if not all(math.isfinite(v) for v in (self.intercept, *self.coef, *self.residuals)):
            raise AnswerLengthError("coefficients and residuals must be finite numbers")

    def expected(self, z: np.ndarray, cap: float) -> np.ndarray:
        """E[min(L, cap)] for standardized features ``z`` (n × d)."""
        log_len = self.intercept + z @ np.asarray(self.coef)
        # Clipped before exp: an odd prompt must not overflow to inf seconds.
        draws = np.exp(np.clip(log_len[:, None] + np.asarray(self.residuals)[None, :], 0.0, 12.0)) - 1.0
        return np.minimum(draws, cap).mean(axis=1)


@dataclass(frozen=True)
class AnswerLengthModel:
    """Expected answer tokens (device-SLM tokens) of each side for one turn."""

    feature_mean: tuple[float, ...]
    feature_scale: tuple[float, ...]
    device: SideFit
    edge: SideFit
    #: The cap the training answers were made with: longer ones are known only to be that long.
    train_cap: int
    n_train: int
    #: Where the rows came from (the models, the data), for the log and the docs.
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("feature_mean", "feature_scale"):
            v = getattr(self, name)
            if len(v) != len(FEATURES) or not all(math.isfinite(x) for x in v):
                raise AnswerLengthError(f"{name} must be {len(FEATURES)} finite numbers")
        if any(s <= 0 for s in self.feature_scale):
            raise AnswerLengthError("feature_scale must be positive")
        if self.train_cap < 1 or self.n_train < 1:
            raise AnswerLengthError("train_cap and n_train must be positive")

    def predict_many(self, prompts: Sequence[str], follow_ups: Sequence[bool], cap: int) -> dict[str, np.ndarray]:
        """Expected capped answer tokens per side for each turn."""
        if cap < 1:
            raise AnswerLengthError(f"cap must be >= 1, got {cap}")
        x = np.stack([turn_features(p, f) for p, f in zip(prompts, follow_ups)])
        z = (x - np.asarray(self.feature_mean)) / np.asarray(self.feature_scale)
        cap = min(cap, self.train_cap)
        return {side: getattr(self, side).expected(z, cap) for side in SIDES}

    def predict(self, prompt: str, *, follow_up: bool, cap: int) -> ResponseLengths:
        out = self.predict_many([prompt], [follow_up], cap)
        return ResponseLengths(device=float(out["device"][0]), edge=float(out["edge"][0]))

    def to_dict(self) -> dict:
        def side(f: SideFit) -> dict:
            return {"intercept": f.intercept, "coef": list(f.coef), "residuals": list(f.residuals)}

        return {
            "format_version": FORMAT_VERSION, "kind": "ridge-log1p-tokens-capped", "features": list(FEATURES),
            "feature_mean": list(self.feature_mean), "feature_scale": list(self.feature_scale),
            "device": side(self.device), "edge": side(self.edge),
            "train_cap": self.train_cap, "n_train": self.n_train, "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "AnswerLengthModel":
        if not isinstance(data, Mapping) or data.get("format_version") != FORMAT_VERSION:
            raise AnswerLengthError(f"not an answer-length model of format_version {FORMAT_VERSION}")
        if tuple(data.get("features", ())) != FEATURES:
            raise AnswerLengthError(f"answer-length features {data.get('features')!r} do not match {list(FEATURES)}")
        try:
            return cls(
                feature_mean=tuple(float(x) for x in data["feature_mean"]),
                feature_scale=tuple(float(x) for x in data["feature_scale"]),
                **{s: SideFit(float(data[s]["intercept"]), tuple(float(x) for x in data[s]["coef"]),
                              tuple(float(x) for x in data[s]["residuals"])) for s in SIDES},
                train_cap=int(data["train_cap"]), n_train=int(data["n_train"]), source=str(data.get("source", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AnswerLengthError(f"malformed answer-length model: {exc!r}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AnswerLengthModel":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise AnswerLengthError(f"cannot read answer-length model {str(path)!r}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AnswerLengthError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _side_fit(z: np.ndarray, tokens: np.ndarray, l2: float) -> SideFit:
    target = np.log1p(tokens)
    intercept = float(target.mean())
    try:
        coef = np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ (target - intercept))
    except np.linalg.LinAlgError:
        raise AnswerLengthError("the features are collinear on these rows: fit with l2 > 0") from None
    resid = target - (intercept + z @ coef)
    qs = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
    return SideFit(intercept, tuple(float(c) for c in coef), tuple(float(r) for r in np.quantile(resid, qs)))


def fit(
    prompts: Sequence[str], follow_ups: Sequence[bool], tokens: Mapping[str, Sequence[float]], *,
    train_cap: int, l2: float = 1.0, source: str = "",
) -> AnswerLengthModel:
    """Fit both sides on rows of (prompt, follow-up?, answer tokens per side, each ≤ ``train_cap``)."""
    n = len(prompts)
    if n < 5 or len(follow_ups) != n:
        raise AnswerLengthError(f"need at least 5 rows with a follow-up flag each, got {n}")
    ys = {}
    for side in SIDES:
        y = np.asarray(tokens[side], dtype=float)
        if y.shape != (n,) or not np.all(np.isfinite(y)) or np.any(y < 0):
            raise AnswerLengthError(f"{side}: expected {n} finite non-negative lengths")
        ys[side] = np.minimum(y, train_cap)
    if not (math.isfinite(l2) and l2 >= 0):
        raise AnswerLengthError(f"l2 must be a non-negative number, got {l2!r}")
    x = np.stack([turn_features(p, f) for p, f in zip(prompts, follow_ups)])
    mean, std = x.mean(axis=0), x.std(axis=0)
    scale = np.where(std > 1e-12, std, 1.0)  # a constant feature: weight irrelevant
    z = (x - mean) / scale
    return AnswerLengthModel(
        feature_mean=tuple(float(v) for v in mean), feature_scale=tuple(float(v) for v in scale),
        **{side: _side_fit(z, ys[side], l2) for side in SIDES},
        train_cap=int(train_cap), n_train=n, source=source,
    )


class LiveLengths:
    """The model's per-turn lengths, scaled per side by how this run's
    answers compared with its predictions.

    Two levels, as answers within a conversation are alike in length: the
    run's factor is the geometric mean of (1 + actual)/(1 + predicted) over
    the last ``window`` answers, shrunk towards 1 by ``prior`` pseudo-answers;
    this conversation's factor is the same over its own answers, shrunk
    towards the run's by ``conversation_prior`` pseudo-answers."""

    def __init__(self, model: AnswerLengthModel, *, prior: float = 3.0, conversation_prior: float = 1.0,
                 window: int = 32) -> None:
        if prior < 0 or conversation_prior <= 0 or window < 1:
            raise AnswerLengthError("prior must be >= 0, conversation_prior > 0 and window >= 1")
        self.model = model
        self.prior = prior
        self.conversation_prior = conversation_prior
        self._log_ratios = {side: deque(maxlen=window) for side in SIDES}
        self._conversation: dict[str, list[float]] = {side: [] for side in SIDES}

    def new_conversation(self) -> None:
        """A new conversation: its own factor starts from the run's."""
        self._conversation = {side: [] for side in SIDES}

    def run_correction(self, side: str) -> float:
        ratios = self._log_ratios[side]
        return math.exp(sum(ratios) / (len(ratios) + self.prior)) if ratios else 1.0

    def correction(self, side: str) -> float:
        """The factor of ``side``'s next prediction."""
        own = self._conversation[side]
        k = self.conversation_prior
        return math.exp((sum(own) + k * math.log(self.run_correction(side))) / (len(own) + k))

    def predict(self, prompt: str, *, follow_up: bool, cap: int) -> ResponseLengths:
        raw = self.model.predict(prompt, follow_up=follow_up, cap=cap)
        return ResponseLengths(
            device=min(float(cap), raw.device * self.correction("device")),
            edge=min(float(cap), raw.edge * self.correction("edge")),
        )

    def observe(self, side: str, prompt: str, *, follow_up: bool, cap: int, answer_tokens: int) -> None:
        """One answer of ``side`` to ``prompt``: its length corrects that side's next predictions."""
        if side not in SIDES or answer_tokens < 0:
            raise AnswerLengthError(f"bad observation: side {side!r}, {answer_tokens} tokens")
        predicted = getattr(self.model.predict(prompt, follow_up=follow_up, cap=cap), side)
        # Bounded: one empty or cut answer must not swing every later prediction.
        log_ratio = min(MAX_LOG_RATIO, max(-MAX_LOG_RATIO, math.log((1.0 + min(answer_tokens, cap)) / (1.0 + predicted))))
        self._log_ratios[side].append(log_ratio)
        self._conversation[side].append(log_ratio)
