"""The simulator's per-turn response lengths: which L̄_r the decision sees and
which L_r each turn is charged (``simulate --response-lengths/--charge-lengths``).

Kept apart from :mod:`device_runtime.sim.response_length` (the regression
itself) because a plan is about the simulator's two uses of a length, eq. (11)
against eqs. (5)-(7), not about predicting one; see "Per-query response
lengths" in docs/simulation.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from device_runtime.routing.cost_model import ResponseLengths
from device_runtime.sim.response_length import LengthModel, LengthModelError, fit_trace, length_rows
from device_runtime.sim.simulate import LengthPlan, LengthSource, recorded_lengths
from device_runtime.sim.traces import Dialogue

#: Where the decision's L̄_r comes from (``simulate --response-lengths``).
DECISION_MODES: tuple[str, ...] = ("average", "train-mean", "predicted", "true")
#: Where the charge's L_r comes from (``simulate --charge-lengths``).
CHARGE_MODES: tuple[str, ...] = ("average", "true", "scaled")


def length_plan(
    decision: str,
    charge: str,
    dialogues: Sequence[Dialogue],
    *,
    benchmark: str,
    model: LengthModel | None = None,
    val_fraction: float = 0.2,
    average: ResponseLengths | None = None,
) -> LengthPlan:
    """A :class:`device_runtime.sim.simulate.LengthPlan` for the simulator.

    ``decision``: ``average`` (the preset's L̄_r, the paper), ``train-mean``
    (this trace's train-split mean, one number per target), ``predicted``
    (``model``, or one fitted on the train split of ``dialogues``), ``true``
    (the recorded lengths: an oracle upper bound on length knowledge).
    ``charge``: ``average``, ``true``, or ``scaled``: the recorded lengths
    times (``average`` / the trace's mean), per target, so that the charge
    keeps each query's relative length but has the preset's mean.  Under
    ``scaled`` the non-average decisions are scaled by the same factors: the
    world, not the predictor, is rescaled.  ``dialogues`` should be the whole
    trace, before any ``--split``, so the fit sees only train rows.
    """
    _check_modes(decision, charge, dialogues, benchmark)
    scale = _charge_scale(dialogues, average) if charge == "scaled" else None
    decide = _decision_source(decision, dialogues, benchmark, model, val_fraction)
    charged = recorded_lengths if charge != "average" else None
    if scale is not None:
        decide = _scaled(decide, scale) if decide is not None else None
        charged = _scaled(charged, scale)
    return LengthPlan(decide=decide, charge=charged)


def _check_modes(decision: str, charge: str, dialogues: Sequence[Dialogue], benchmark: str) -> None:
    """Known modes, and recorded lengths in the trace for any mode but the paper's."""
    if decision not in DECISION_MODES:
        raise LengthModelError(f"decision lengths must be one of {DECISION_MODES}, got {decision!r}")
    if charge not in CHARGE_MODES:
        raise LengthModelError(f"charge lengths must be one of {CHARGE_MODES}, got {charge!r}")
    has_lengths = any(
        t.response_words_device is not None and t.response_words_edge is not None
        for d in dialogues
        for t in d.turns
    )
    if (charge != "average" or decision != "average") and not has_lengths:
        raise LengthModelError(
            f"{benchmark}: the trace has no recorded response lengths (only GSM8K's responses file "
            "has them); use --response-lengths average --charge-lengths average"
        )


def _charge_scale(dialogues: Sequence[Dialogue], average: ResponseLengths | None) -> tuple[float, float]:
    """Per target, the preset's mean over the trace's recorded mean (charge ``scaled``)."""
    if average is None:
        raise LengthModelError("charge 'scaled' needs the preset's average lengths")
    _, all_dev, all_edge = length_rows(dialogues)
    m_dev, m_edge = float(np.mean(all_dev)), float(np.mean(all_edge))
    if m_dev <= 0 or m_edge <= 0:
        raise LengthModelError("charge 'scaled': the recorded mean response length is 0")
    return (average.device / m_dev, average.edge / m_edge)


def _decision_source(
    decision: str,
    dialogues: Sequence[Dialogue],
    benchmark: str,
    model: LengthModel | None,
    val_fraction: float,
) -> LengthSource | None:
    """The decision's per-turn L̄_r; None for ``average`` (the params' own)."""
    if decision == "train-mean":
        _, dev, edge = length_rows(dialogues, "train", val_fraction)
        if not dev:
            raise LengthModelError(f"{benchmark}: no recorded response lengths on the train split")
        mean = ResponseLengths(float(np.mean(dev)), float(np.mean(edge)))
        return lambda turn: mean
    if decision == "predicted":
        return _predicted(dialogues, benchmark, model, val_fraction)
    if decision == "true":
        return recorded_lengths
    return None


def _predicted(
    dialogues: Sequence[Dialogue], benchmark: str, model: LengthModel | None, val_fraction: float
) -> LengthSource:
    """``model``'s lengths (fitted on the train split when None), every prompt predicted once."""
    if model is None:
        model = fit_trace(dialogues, benchmark=benchmark, val_fraction=val_fraction)
    elif model.benchmark != benchmark:
        raise LengthModelError(
            f"length model was fitted on {model.benchmark!r}, not {benchmark!r}: "
            "response lengths do not transfer across benchmarks"
        )
    # Predict every prompt once, up front: the sweep replays turns per θ.
    prompts = list(dict.fromkeys(t.prompt for d in dialogues for t in d.turns))
    dev, edge = model.predict_many(prompts)
    table = {p: ResponseLengths(float(a), float(b)) for p, a, b in zip(prompts, dev, edge)}
    return lambda turn: table.get(turn.prompt) or model.predict(turn.prompt)


def _scaled(source: LengthSource, scale: tuple[float, float]) -> LengthSource:
    def scaled(turn) -> ResponseLengths:
        r = source(turn)
        return ResponseLengths(r.device * scale[0], r.edge * scale[1])

    return scaled
