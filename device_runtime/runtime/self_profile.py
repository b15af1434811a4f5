"""Self-profiling: ``chat`` and ``demo`` measure this machine before the first turn.

Without it the live runtime would decide on the paper's Table I (γ measured
for 3B and 32B models): its predictions were off by a factor of two to five
for these small models.  So before the first turn, unless a saved
``--profile`` is given (it wins) or ``--no-self-profile`` is, the runtime

- warms each model up with one 2-token answer (unrecorded: the page-in of the
  weights, buffers and graphs, which no later turn pays; this is the warm-up
  ``demo`` always made);
- lets each model answer a few short team-written prompts
  (:data:`CALIBRATION_PROMPTS`, not the demo's dialogues), capped at the
  run's ``--max-tokens`` (at most :attr:`SelfProfileSettings.max_tokens`):
  γ prefill (the slope of prefill seconds against prompt tokens), γ decode,
  the fixed time per call that γ · tokens leaves out (``call_s_device``,
  ``call_s_edge``), and each model's mean answer length L̄_r.  The device
  SLM's cache keeps the system message between runs, as a conversation's
  first turn finds it; the edge's runs are timed by the edge itself, so the
  link is not in them;
- times the router (τ_r, eq. 4) when the policy runs the BERT router;
- sends a few ``Echo`` round trips of growing size for δ and B (eq. 3).

All of it goes through :mod:`device_runtime.link.profiler`, the code of
``edgeroute profile``, into the same PROFILE.json object, which then replaces
the preset's values exactly as a saved ``--profile`` would
(:meth:`~device_runtime.link.profile.Profile.cost_params`).  Online estimation
(:mod:`device_runtime.runtime.online`, on by default) keeps the values current
from there.  A part that cannot be measured (the edge unreachable) keeps the
preset's values and says so in the log; nothing here fails a run.

:func:`prediction_errors` is the check: per side, the median of
|predicted − measured| / measured over the turns that side answered.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from device_runtime.core.flags import flag

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.link.edge_client import EdgeClient
    from device_runtime.link.profiler import ProfileSettings
    from device_runtime.llm.slm import SLMBackend
    from device_runtime.routing.cost_model import CostParams
    from device_runtime.runtime.telemetry import TurnTelemetry

log = logging.getLogger(__name__)

#: Team-written prompts of several lengths (about 8 to 60 device-SLM tokens),
#: kept apart from the demo's dialogues so that the demo does not measure its
#: own turns.  The order spreads the lengths: any first few still show a slope.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "What is the capital of Australia?",
    "I am writing a short note to my neighbours about a street party on Saturday "
    "afternoon. It starts at three, everyone brings one dish to share, games for the "
    "children run until six, and we need two volunteers to set up tables in the "
    "morning. Please draft the note in a friendly tone.",
    "A recipe needs 250 grams of flour for 10 biscuits. How much flour do I need for 24 biscuits?",
    "My bike chain keeps slipping when I pedal hard uphill. What are the usual causes, "
    "and which one should I check first?",
)
WARM_UP_PROMPT = "Hello."


@dataclass(frozen=True)
class SelfProfileSettings:
    """What the self-profile measures before the first turn (``chat``, ``demo``)."""

    self_profile: bool = field(default=True, metadata=flag(
        "before the first turn, measure γ (prefill, decode, per call) and the answer length of "
        "both models, τ_r, and δ and B by Echo (a few seconds); --no-self-profile keeps the "
        "paper's Table I values; a --profile FILE is used instead when given"
    ))
    prompts: int = 3
    """Calibration prompts each model answers (2 to len(CALIBRATION_PROMPTS))."""
    max_tokens: int = 48
    """Cap on each calibration answer; the run's --max-tokens when that is smaller."""
    link_sizes: tuple[int, ...] = (0, 16384, 65536)
    """Echo payload sizes, bytes (each direction)."""
    link_reps: int = 2
    """Echo round trips per size, after one unrecorded."""
    timeout_s: float = 30.0
    """Deadline of each edge call of the self-profile."""

    def __post_init__(self) -> None:
        if not 2 <= self.prompts <= len(CALIBRATION_PROMPTS):
            raise ValueError(f"prompts must be in [2, {len(CALIBRATION_PROMPTS)}], got {self.prompts}")
        if self.max_tokens < 2 or self.link_reps < 1 or not self.timeout_s > 0:
            raise ValueError("max_tokens must be >= 2, link_reps >= 1 and timeout_s > 0")


@dataclass
class SelfProfile:
    """What the self-profile measured: the PROFILE.json object, and how long each part took."""

    profile: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    #: Parts that could not be measured, and why (their values stay the preset's).
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def describe(self) -> str:
        """One line for the log: the time it took and the values it found."""
        p = self.profile
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        line = (
            f"self-profile in {self.total_s:.1f} s ({parts}): "
            f"device γ prefill {p['gamma_s_prefill'] * 1e3:.1f} ms/tok, decode {p['gamma_s_decode'] * 1e3:.1f} "
            f"ms/tok, call {p.get('call_s_device', 0.0) * 1e3:.0f} ms, L̄_r {p.get('response_tokens_device', 0):.0f}"
        )
        if "edge" in self.seconds:
            line += (
                f"; edge γ prefill {p['gamma_e_prefill'] * 1e3:.1f}, decode {p['gamma_e_decode'] * 1e3:.1f} ms/tok, "
                f"call {p.get('call_s_edge', 0.0) * 1e3:.0f} ms, L̄_r {p.get('response_tokens_edge', 0):.0f}; "
                f"δ {p['overhead_s'] * 1e3:.1f} ms"
            )
        if self.skipped:
            line += "; not measured: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return line


def _profile_settings(settings: SelfProfileSettings, max_tokens: int, edge: "EdgeClient | None") -> "ProfileSettings":
    from device_runtime.link.profiler import ProfileSettings

    return ProfileSettings(
        edge=edge.target if edge is not None else None,
        parts=("slm", "router", "edge", "link") if edge is not None else ("slm", "router"),
        sizes_bytes=settings.link_sizes, link_reps=settings.link_reps,
        prompt_tokens=(16, 64), reps=1, max_tokens=max(2, min(max_tokens, settings.max_tokens)),
        answer_prompts=settings.prompts, timeout_s=settings.timeout_s,
    )


def _answers(answer, desc: str, prompts: Sequence[str]):
    """One unrecorded warm-up answer, then the calibration answers and their γ fit."""
    from device_runtime.link.profiler import fit_gamma, mean_answer_tokens

    answer(WARM_UP_PROMPT)
    lengths = mean_answer_tokens(answer, prompts, desc)
    return fit_gamma(lengths.runs, desc), lengths


def measure(
    slm: "SLMBackend", edge: "EdgeClient | None", router=None, *,
    max_tokens: int, settings: SelfProfileSettings | None = None,
) -> SelfProfile:
    """Measure the device SLM, ``router`` (its τ_r, when it has none of its
    own), and ``edge`` with its link (when given and reachable)."""
    from device_runtime.link.edge_client import EdgeError, EdgeUnavailable
    from device_runtime.link.estimation import bytes_per_token
    from device_runtime.link.profiler import (
        Measurements, assemble_profile, call_time, edge_answer, profile_link, profile_router, slm_answer,
    )

    settings = settings or SelfProfileSettings()
    ps = _profile_settings(settings, max_tokens, edge)
    prompts = CALIBRATION_PROMPTS[: settings.prompts]
    count = slm.count_tokens
    texts = list(CALIBRATION_PROMPTS)
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}
    m: dict[str, Any] = {}

    t0 = time.perf_counter()
    m["slm"], m["slm_answers"] = _answers(slm_answer(slm, ps, reset=False), "self-profile: device", prompts)
    seconds["device"] = time.perf_counter() - t0
    if router is not None and getattr(router, "tau_r", 0.0) is None:
        t0 = time.perf_counter()
        m["router"] = profile_router(router, texts, ps, count)
        seconds["router"] = time.perf_counter() - t0
    if edge is not None:
        t0 = time.perf_counter()
        try:
            m["edge"], m["edge_answers"] = _answers(edge_answer(edge, ps, count), "self-profile: edge", prompts)
            seconds["edge"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            m["link"] = profile_link(edge, ps)
            seconds["link"] = time.perf_counter() - t0
        except (EdgeUnavailable, EdgeError) as exc:
            skipped["edge"] = str(exc)
            m.pop("edge", None), m.pop("edge_answers", None)
    measured = Measurements(n_texts=len(texts), bytes_per_token=bytes_per_token(texts, count),
                            n_prompts=len(prompts), **m)
    profile = assemble_profile(measured, ps)
    # The device's runs found the system message cached, as a first turn does,
    # so what γ · tokens leaves out is the per-call cost a turn pays.
    profile["call_s_device"] = call_time(m["slm"].runs, m["slm"].prefill, m["slm"].decode)
    profile["sources"]["call_s_device"] = f"measured ({len(m['slm'].runs)} calls)"
    profile["meta"]["self_profile"] = {"seconds": dict(seconds), "skipped": dict(skipped)}
    return SelfProfile(profile, seconds, skipped)


def self_profiled_params(
    base: "CostParams", slm: "SLMBackend", edge: "EdgeClient | None", router=None, *,
    max_tokens: int, settings: SelfProfileSettings | None = None,
) -> tuple["CostParams", SelfProfile]:
    """``base`` with every measured value replaced, as a saved profile would
    (:meth:`~device_runtime.link.profile.Profile.cost_params`, answer lengths included)."""
    from device_runtime.link.profile import Profile

    result = measure(slm, edge, router, max_tokens=max_tokens, settings=settings)
    return Profile.read(result.profile).cost_params(base, response_lengths=True), result


# --- how well it predicts --------------------------------------------------------------


@dataclass(frozen=True)
class SideError:
    """One side's relative prediction errors |predicted − measured| / measured."""

    n: int
    median: float | None
    #: The same with the answer's actual length (``predicted_posthoc_s``): the
    #: timing model apart from the length guess.
    median_posthoc: float | None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def prediction_errors(records: Iterable["TurnTelemetry"]) -> dict[str, SideError]:
    """Per side, over the turns that side answered (fallbacks left out: their
    time includes the failed edge attempt), the median relative error of the
    prediction the decision used, and of the post-hoc one."""
    out = {}
    recs = [r for r in records if not r.fallback and r.measured_s > 0]
    for side in ("device", "edge"):
        mine = [r for r in recs if r.target == side]
        errs = [abs(r.predicted_s[side] - r.measured_s) / r.measured_s for r in mine]
        post = [abs(r.predicted_posthoc_s - r.measured_s) / r.measured_s
                for r in mine if r.predicted_posthoc_s is not None]
        out[side] = SideError(len(errs), _median(errs), _median(post))
    return out


def format_errors(errors: dict[str, SideError]) -> str:
    """The summary line: ``median |pred − meas| / meas: device 12% (n=3; 5% with the actual length), edge ...``."""
    parts = []
    for side, e in errors.items():
        if e.median is None:
            parts.append(f"{side} - (n=0)")
            continue
        post = "" if e.median_posthoc is None else f"; {e.median_posthoc:.0%} with the answer's actual length"
        parts.append(f"{side} {e.median:.0%} (n={e.n}{post})")
    return "prediction error, median |predicted - measured| / measured: " + ", ".join(parts)
