"""PROFILE.json: the measured cost parameters, and how they enter the cost model.

``edgeroute profile`` writes it; :meth:`Profile.read` is its one reader:
``--profile`` on chat and demo reads it through :func:`live_cost_params`, and on
simulate through :class:`Profile` restated per word (:func:`in_words`).  Units
are seconds and tokens (device-SLM tokens, the unit of the runtime's L_p, C_t
and ΔC):

==========================  =====================================================
``gamma_s_prefill``         γ_s for prefill, s/token (eq. 1)
``gamma_s_decode``          γ_s for decode, s/token (eq. 5)
``gamma_e_prefill``         γ_e for prefill, s/token (eq. 1), from the edge's timings
``gamma_e_decode``          γ_e for decode, s/token (eq. 5)
``tau_r``                   router time per token, s/token (eq. 4)
``bandwidth_tokens_per_s``  B, tokens/s (eq. 3) = bytes/s ÷ ``bytes_per_token``
``overhead_s``              δ, s (eq. 3): the RTT intercept of the Ping/Echo fit
``bytes_per_token``         UTF-8 bytes per device-SLM token, measured on real text
==========================  =====================================================

Optional (an extension of eq. (1), absent = 0 as in the paper):

==========================  =====================================================
``call_s_edge``             s per edge call not explained by γ_e · tokens (request
                            handling, sampler set-up, the first token): the median
                            residual of the edge's own timings
``call_s_device``           the same for the device SLM (not measured by
                            ``edgeroute profile``: in-process, it is within noise)
``response_tokens_device``  L̄_r^s: mean answer length of the device SLM on real
                            user prompts, device-SLM tokens, at the profile's
                            ``meta.max_tokens`` (the paper's per-benchmark
                            averages describe other models)
``response_tokens_edge``    L̄_r^e: the same for the edge LLM
==========================  =====================================================

The answer lengths are applied by the live runtime (:func:`live_cost_params`:
chat, demo) but not by ``simulate``, whose traces come with their own
benchmark's lengths.

Other keys (``fit``, ``sources``, ``meta``) describe how the numbers were made
and are ignored by the cost model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from device_runtime.core.flags import flag
from device_runtime.routing import cost_model
from device_runtime.routing.cost_model import CostParams, Link, ModelTiming, ResponseLengths

#: The contract's keys (issue 5), all required in a written profile.
PARAM_KEYS: tuple[str, ...] = (
    "gamma_s_prefill",
    "gamma_s_decode",
    "gamma_e_prefill",
    "gamma_e_decode",
    "tau_r",
    "bandwidth_tokens_per_s",
    "overhead_s",
    "bytes_per_token",
)


#: Optional parameters: a fixed time per call of each model (``ModelTiming.call_s``).
CALL_KEYS: tuple[str, ...] = ("call_s_device", "call_s_edge")
#: Optional measured answer lengths L̄_r^s, L̄_r^e (tokens).
LENGTH_KEYS: tuple[str, ...] = ("response_tokens_device", "response_tokens_edge")


class ProfileError(ValueError):
    """A profile is unreadable, incomplete, or holds a bad value."""


def validate_profile(data: Any, *, require_all: bool = True) -> dict[str, Any]:
    """Check the parameter keys; returns the profile as a dict."""
    if not isinstance(data, dict):
        raise ProfileError("a profile must be a JSON object")
    missing = [k for k in PARAM_KEYS if k not in data]
    if require_all and missing:
        raise ProfileError(f"profile lacks {missing}")
    for k in PARAM_KEYS + CALL_KEYS + LENGTH_KEYS:
        if k not in data:
            continue
        v = data[k]
        if isinstance(v, int) and not isinstance(v, bool):
            try:
                v = data[k] = float(v)  # a huge integer is not a usable time either
            except OverflowError:
                raise ProfileError(f"profile {k} must be a non-negative number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ProfileError(f"profile {k} must be a non-negative number, got {v!r}")
    for k in ("bandwidth_tokens_per_s", "bytes_per_token"):
        if k in data and not data[k] > 0:
            raise ProfileError(f"profile {k} must be > 0")
    return data


def write_profile(path: str | Path, profile: Mapping[str, Any]) -> Path:
    data = validate_profile(dict(profile))
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Profile:
    """The measured parameters of one PROFILE.json, checked.

    :meth:`read` is the one reader of the format, for the live runtime and
    ``simulate`` alike; a partial profile is allowed (the keys it lacks keep
    the base parameters' values), a bad value is a :class:`ProfileError`.
    """

    values: Mapping[str, Any]
    #: Where the profile came from (the path as given), for messages.
    source: str

    @classmethod
    def read(cls, source: str | Path | Mapping[str, Any]) -> "Profile":
        """A PROFILE.json path, or a mapping with its keys."""
        if isinstance(source, Mapping):
            return cls(validate_profile(dict(source), require_all=False), "<mapping>")
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ProfileError(f"cannot read profile {source}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(f"profile {source} is not valid JSON: {exc}") from None
        return cls(validate_profile(data, require_all=False), str(source))

    def cost_params(self, base: CostParams, *, response_lengths: bool = False) -> CostParams:
        """``base`` with every measured parameter replaced (γ_s, γ_e, τ_r, B, δ
        and per-call times, eqs. 1-7); ``response_lengths``: the measured L̄_r
        too, for live routing with the profiled models."""
        try:
            return _apply(self.values, base, response_lengths)
        except ProfileError:
            raise
        except ValueError as exc:  # e.g. a value cost_model rejects
            raise ProfileError(f"bad profile: {exc}") from None

    def tokens_per_word(self, bytes_per_word: float) -> float:
        """Device-SLM tokens per word of text with ``bytes_per_word`` UTF-8
        bytes per word: the factor :func:`in_words` restates the profile by."""
        if "bytes_per_token" not in self.values:
            raise ProfileError(
                f"{self.source}: no bytes_per_token, which converts its per-token times "
                "to the traces' words"
            )
        return bytes_per_word / float(self.values["bytes_per_token"])


def _apply(data: Mapping[str, Any], base: CostParams, response_lengths: bool) -> CostParams:
    g = lambda k, default: float(data.get(k, default))  # noqa: E731
    if response_lengths:
        base = base.with_(response=ResponseLengths(
            g("response_tokens_device", base.response.device), g("response_tokens_edge", base.response.edge),
        ))
    return base.with_(
        gamma_s=ModelTiming(
            g("gamma_s_prefill", base.gamma_s.prefill_s_per_token),
            g("gamma_s_decode", base.gamma_s.decode_s_per_token),
            g("call_s_device", base.gamma_s.call_s),
        ),
        gamma_e=ModelTiming(
            g("gamma_e_prefill", base.gamma_e.prefill_s_per_token),
            g("gamma_e_decode", base.gamma_e.decode_s_per_token),
            g("call_s_edge", base.gamma_e.call_s),
        ),
        link=Link(
            g("bandwidth_tokens_per_s", base.link.bandwidth_tokens_per_s),
            g("overhead_s", base.link.overhead_s),
        ),
        tau_r=g("tau_r", base.tau_r),
    )


def in_words(params: CostParams, tokens_per_word: float) -> CostParams:
    """``params`` measured per device-SLM token, restated per word (the paper's
    and the simulator's unit: whitespace-separated words): γ and τ_r grow by
    tokens-per-word, B shrinks by it; δ and per-call times are unchanged."""
    k = float(tokens_per_word)
    if not (k > 0 and k < float("inf")):
        raise ProfileError(f"tokens per word must be a positive number, got {tokens_per_word!r}")

    def timing(t: ModelTiming) -> ModelTiming:
        return ModelTiming(t.prefill_s_per_token * k, t.decode_s_per_token * k, t.call_s)

    return params.with_(
        gamma_s=timing(params.gamma_s),
        gamma_e=timing(params.gamma_e),
        link=Link(params.link.bandwidth_tokens_per_s / k, params.link.overhead_s),
        tau_r=params.tau_r * k,
    )


# --- live routing ---------------------------------------------------------------


def live_cost_params(
    profile: str | Path | Mapping[str, Any] | None = None,
    *,
    benchmark: str = "mt-bench",
) -> CostParams:
    """Cost parameters for live routing.

    Starts from the paper's Table I preset (``benchmark`` picks L̄_r and α) in
    ``session`` upload mode, since the edge keeps the session and only unseen
    turns travel.  A profile (a PROFILE.json path from ``edgeroute profile``,
    or a mapping with its keys) replaces the measured γ_s, γ_e, τ_r, B, δ,
    per-call times and answer lengths L̄_r; missing keys keep the preset's.
    """
    params = cost_model.paper_params(benchmark, upload_mode="session")
    if profile is None:
        return params
    return Profile.read(profile).cost_params(params, response_lengths=True)


@dataclass(frozen=True)
class LiveCostSettings:
    """Where the live runtime's cost parameters come from (``chat``, ``demo``)."""

    alpha: float | None = field(default=None, metadata=flag("α of eq. (11) (default: the preset's)"))
    profile: str | None = field(default=None, metadata=flag(
        "PROFILE.json from `edgeroute profile`: measured gamma_s_prefill, gamma_s_decode, "
        "gamma_e_prefill, gamma_e_decode, tau_r, bandwidth_tokens_per_s, overhead_s "
        "(missing keys keep the paper preset)",
        metavar="JSON",
    ))
    benchmark: str = field(default="mt-bench", metadata=flag(
        "paper preset for L̄_r and α (Tables I-III)",
        choices=lambda: list(cost_model.PAPER_RESPONSE_LENGTHS),
    ))

    def cost_params(self) -> CostParams:
        """:func:`live_cost_params`, with α replaced when given."""
        params = live_cost_params(self.profile, benchmark=self.benchmark)
        return params if self.alpha is None else params.with_(alpha=self.alpha)
