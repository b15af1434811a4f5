"""One ``edgeroute simulate`` run, from typed settings to the summary dict.

The CLI parses flags into :class:`SimulateSettings` (whose fields make those
flags, :mod:`device_runtime.core.flags`), picks the cost parameters (preset,
and a measured profile, which the sim layer cannot read: it lives in the link
layer) and prints; everything between, trace selection, length plan, router
construction, the sweep and the summary's layout, is here, so that another
caller (a script, a notebook) gets the same numbers as ``simulate --json``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from device_runtime.core.flags import flag
from device_runtime.routing import cost_model
from device_runtime.sim.length_plan import CHARGE_MODES, DECISION_MODES
from device_runtime.sim.simulate import LengthPlan, SimulationError
from device_runtime.sim.traces import BENCHMARKS, Dialogue

#: ``--split`` values: every dialogue, or one side of :func:`~device_runtime.sim.traces.split_of`.
SPLITS: tuple[str, ...] = ("all", "train", "val")


# --- flag parsers: argparse reports their ArgumentTypeError as "argument --x: ..." ---------------


def router_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of router names")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"router listed twice in {text!r}")
    return names


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0.0 and math.isfinite(value)) or value > 1e6:
        raise argparse.ArgumentTypeError(f"expected a finite number in [0, 1e6], got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
    return value


@dataclass(frozen=True)
class SimulateSettings:
    """What one simulation run evaluates; each field is a ``simulate`` flag."""

    benchmark: str = field(metadata=flag("", choices=BENCHMARKS))
    data_dir: str = field(
        metadata=flag("directory laid out like RouteLLM's routellm/evals/ (mmlu/, gsm8k/, mt_bench/)")
    )
    routers: list[str] = field(
        default_factory=lambda: ["random", "oracle"],
        metadata=flag("comma-separated router names (random, oracle, bert); default: random,oracle",
                      type=router_list),
    )
    preset: str = field(
        default="paper", metadata=flag("cost parameters (Table I-III)", choices=lambda: sorted(cost_model.PRESETS))
    )
    profile: str | None = field(
        default=None,
        metadata=flag(
            "PROFILE.json from `edgeroute profile`: its measured γ_s, γ_e, τ_r, B, δ and per-call "
            "times replace the preset's, converted from device-SLM tokens to the traces' words with "
            "the profile's bytes_per_token (α and the response lengths stay the preset's)",
            metavar="JSON",
        ),
    )
    alpha: float | None = field(default=None, metadata=flag("latency weight α of eq. (11)", type=nonneg_float))
    tau_r: float | None = field(
        default=None,
        metadata=flag(
            "router per-token time τ_r in s (eq. 4) for routers that do not set their own; "
            "random and oracle cost 0",
            type=nonneg_float,
        ),
    )
    upload_mode: str = field(
        default="paper",
        metadata=flag(
            "paper: upload C_t + L_p (eq. 3); session: only what the edge has not seen",
            choices=cost_model.UPLOAD_MODES,
        ),
    )
    bundle: str | None = field(default=None, metadata=flag("router bundle directory for --routers bert"))
    response_lengths: str = field(
        default="average",
        metadata=flag(
            "L̄_r the decision (eq. 11) uses: average = the preset's (paper); train-mean = this "
            "trace's train-split mean; predicted = per-query regression (device_runtime.sim.response_length); "
            "true = the recorded lengths (oracle). Non-average needs GSM8K's recorded responses",
            choices=DECISION_MODES,
        ),
    )
    charge_lengths: str | None = field(
        default=None,
        metadata=flag(
            "L_r each turn is charged: the preset's average, the recorded length, or the recorded "
            "length rescaled to the preset's mean (non-average decisions are rescaled alike); "
            "default: average with --response-lengths average, true otherwise",
            choices=CHARGE_MODES,
        ),
    )
    length_model: str | None = field(
        default=None,
        metadata=flag(
            "fitted length model for --response-lengths predicted; default: fit on the train split",
            metavar="JSON",
        ),
    )
    split: str = field(
        default="all",
        metadata=flag(
            "keep dialogues whose first prompt falls in this hash split (traces.split_of)", choices=SPLITS
        ),
    )
    val_fraction: float = field(default=0.2, metadata=flag("fraction in the val split", type=fraction))
    seed: int = field(default=0, metadata=flag("seed of the random router"))
    limit: int | None = field(default=None, metadata=flag("first N dialogues only", type=positive_int))
    points: int = field(default=41, metadata=flag("number of thresholds θ (>= 3)", type=positive_int))
    no_decontaminate: bool = field(default=False, metadata=flag("keep contaminated prompts"))
    threshold: float | None = field(
        default=None,
        metadata=flag(
            "also report each router's operating point at this θ (p̃ units, eq. 12) as `at_threshold`: "
            "check a θ from `edgeroute calibrate` on other data",
            type=finite_float,
        ),
    )

    @property
    def charge(self) -> str:
        """``--charge-lengths``, or its default: average with average decisions, true otherwise."""
        return self.charge_lengths or ("average" if self.response_lengths == "average" else "true")


def select_dialogues(settings: SimulateSettings) -> tuple[list[Dialogue], list[Dialogue]]:
    """(the whole trace, the dialogues to simulate: ``--split``, then ``--limit``).

    Raises :class:`~device_runtime.sim.traces.TraceError` for unreadable data
    and :class:`SimulationError` when nothing is left.
    """
    from device_runtime.sim.traces import load_trace, split_of

    full_trace = load_trace(settings.benchmark, settings.data_dir, decontaminate=not settings.no_decontaminate)
    dialogues = full_trace
    if settings.split != "all":
        dialogues = [
            d for d in dialogues if split_of(d.turns[0].prompt, settings.val_fraction) == settings.split
        ]
    if settings.limit is not None:
        dialogues = dialogues[: settings.limit]
    if not dialogues:
        raise SimulationError("no dialogues left to simulate (check --data-dir, --split and --limit)")
    return full_trace, dialogues


def length_plan_for(
    settings: SimulateSettings, full_trace: Sequence[Dialogue], params: cost_model.CostParams
) -> LengthPlan | None:
    """The plan for non-paper lengths; None for the paper's averages (decision and charge).

    Built on the whole trace, before ``--split``: a fitted model sees only train rows.
    Raises :class:`~device_runtime.sim.response_length.LengthModelError`.
    """
    if (settings.response_lengths, settings.charge) == ("average", "average"):
        return None
    from device_runtime.sim.length_plan import length_plan
    from device_runtime.sim.response_length import LengthModel

    model = LengthModel.load(settings.length_model) if settings.length_model else None
    return length_plan(
        settings.response_lengths,
        settings.charge,
        full_trace,
        benchmark=settings.benchmark,
        model=model,
        val_fraction=settings.val_fraction,
        average=params.response,
    )


def router_factories(settings: SimulateSettings, dialogues: Sequence[Dialogue]) -> dict[str, Callable]:
    """Name -> a callable giving the router for one policy.

    Every router is built here, before the long sweep, so a missing bundle fails fast.
    """
    from device_runtime.sim.simulate import build_router

    factories: dict[str, Callable] = {}
    for name in settings.routers:
        router = build_router(name, dialogues, seed=settings.seed, bundle=settings.bundle)
        if name == "random":
            # Stateful: a fresh one per policy, so both policies get the same draws.
            factories[name] = lambda: build_router("random", dialogues, seed=settings.seed)
        else:
            factories[name] = lambda router=router: router
    return factories


def run_simulation(
    settings: SimulateSettings,
    full_trace: Sequence[Dialogue],
    dialogues: Sequence[Dialogue],
    params: cost_model.CostParams,
    *,
    tokens_per_word: float | None = None,
    progress: bool = True,
) -> dict:
    """Sweep every router over ``dialogues``; returns the ``simulate --json`` summary.

    ``params`` are the preset's, with a profile already applied (its
    ``tokens_per_word`` goes into the summary); ``--alpha``/``--tau-r`` are
    applied here, after it.  Raises the sim layer's errors (SimulationError,
    MetricError, LengthModelError) for the caller to report.
    """
    from device_runtime.sim.simulate import SimConfig, simulate

    if settings.alpha is not None:
        params = params.with_(alpha=settings.alpha)
    if settings.tau_r is not None:
        params = params.with_(tau_r=settings.tau_r)
    plan = length_plan_for(settings, full_trace, params)
    length_kw = {"lengths": plan} if plan is not None else {}
    factories = router_factories(settings, dialogues)
    config = SimConfig(
        benchmark=settings.benchmark, params=params, points=settings.points, threshold=settings.threshold, **length_kw
    )
    result = simulate(config, dialogues, factories, progress=progress)

    summary = result.to_dict()
    summary["preset"] = settings.preset
    summary["split"] = settings.split
    summary["seed"] = settings.seed
    summary["data_dir"] = str(settings.data_dir)
    if tokens_per_word is not None:
        summary["profile"] = {"path": str(settings.profile), "tokens_per_word": tokens_per_word}
    if plan is not None:  # absent by default, so the paper-mode summary is unchanged
        summary["response_lengths"] = {"decision": settings.response_lengths, "charge": settings.charge}
    return summary
