"""Measuring γ_s, γ_e, τ_r, B and δ, and assembling PROFILE.json (``edgeroute profile``).

- γ_s (eqs. 1, 5): the device SLM answers prompts of several lengths; prefill
  γ is the slope of prefill seconds against prompt tokens, decode γ the
  decode seconds per generated token.
- γ_e: the same prompts on the edge, timed by the edge itself (the final
  message's ``prefill_s``/``decode_s``), so the link is not in it.
- τ_r (eq. 4): the router scores texts of several lengths; the slope of
  seconds against tokens.
- δ and B (eq. 3): Echo round trips with payloads of growing size, uplink and
  downlink, fitted as ``RTT = δ + size/B`` (:func:`~device_runtime.link.estimation.fit_link`).

Every count is in device-SLM tokens of the text, the unit the runtime's cost
model uses for L_p, C_t and ΔC.  The texts and prompts come from the caller
(the CLI reads MT-Bench-101 through :mod:`device_runtime.runtime.dialogues`,
a layer above this one).  Measuring (:func:`run_profile`) and assembling the
JSON (:func:`assemble_profile`) are apart so that the layout of PROFILE.json,
which ``simulate --profile`` and the runtime read, is one pure function.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from device_runtime.core.flags import flag
from device_runtime.link.estimation import LinkFit

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.link.credentials import ChannelSecurity

log = logging.getLogger(__name__)

PARTS = ("link", "edge", "slm", "router")
#: Payload sizes of the Echo sweep; larger ones are skipped once a round trip
#: exceeds ``max_rtt_s`` (a slow link needs no large transfer to show its slope).
#: The largest stays under the edge's default 1 MiB message and Echo caps.
DEFAULT_SIZES = (0, 4096, 16384, 65536, 262144, 786432)


def int_list(value: str) -> tuple[int, ...]:
    """``"32,128"`` -> (32, 128); the flag parser of ``--sizes`` and ``--prompt-tokens``."""
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def part_list(value: str) -> tuple[str, ...]:
    """``"link,edge"`` -> ("link", "edge"); :class:`ProfileSettings` checks the names."""
    return tuple(x.strip() for x in value.split(",") if x.strip())


@dataclass(frozen=True)
class ProfileSettings:
    """What ``edgeroute profile`` measures, and how much; each field is a flag."""

    edge: str | None = field(
        default=None, metadata=flag("edge service (needed for the link and edge parts)", metavar="HOST:PORT")
    )
    parts: tuple[str, ...] = field(
        default=PARTS, metadata=flag(f"comma-separated subset of {','.join(PARTS)}", type=part_list)
    )
    sizes_bytes: tuple[int, ...] = field(
        default=DEFAULT_SIZES,
        metadata=flag("Echo payload sizes in bytes", name="--sizes", dest="sizes", type=int_list),
    )
    #: Round trips per payload size (plus one unrecorded warm-up).
    link_reps: int = field(default=5, metadata=flag("round trips per payload size"))
    #: Stop growing the payload once a size's median RTT exceeds this.
    max_rtt_s: float = field(
        default=1.5, metadata=flag("stop growing payloads past this RTT (s)", name="--max-rtt", dest="max_rtt")
    )
    #: Prompt lengths for γ_s, γ_e and τ_r.
    prompt_tokens: tuple[int, ...] = field(
        default=(32, 128, 384), metadata=flag("prompt lengths for γ and τ_r", type=int_list)
    )
    #: Tokens generated per γ run (decode γ).
    max_tokens: int = field(default=32, metadata=flag("tokens generated per γ run"))
    reps: int = field(default=2, metadata=flag("runs per prompt length"))
    #: Real user prompts each model answers (up to ``max_tokens``) to measure its
    #: mean answer length L̄_r; 0 skips it.
    answer_prompts: int = field(
        default=6,
        metadata=flag(
            "real user prompts each model answers, up to --max-tokens, for its mean answer "
            "length L̄_r (0: skip; give the --max-tokens the runtime uses)"
        ),
    )
    data_dir: Path | None = field(
        default=None,
        metadata=flag(
            "shared data dir with mtbench101/ (real text for bytes-per-token); default: the demo dialogues",
            type=Path,
        ),
    )
    slm_path: str | None = field(
        default=None, metadata=flag("device SLM (default: SmolLM2-135M-Instruct)", name="--slm", dest="slm", metavar="GGUF")
    )
    bundle: str | None = field(default=None, metadata=flag("router bundle (default: the shipped one)", metavar="DIR"))
    threads: int | None = field(default=None, metadata=flag("device SLM CPU threads"))
    timeout_s: float = field(
        default=120.0, metadata=flag("edge call deadline (s)", name="--timeout", dest="timeout")
    )

    def __post_init__(self) -> None:
        bad = set(self.parts) - set(PARTS)
        if bad or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {self.parts}")
        if ("link" in self.parts or "edge" in self.parts) and not self.edge:
            raise ValueError("--edge HOST:PORT is needed to profile the link and the edge")
        if len(set(self.sizes_bytes)) < 2 or min(self.sizes_bytes) < 0:
            raise ValueError("need at least two distinct non-negative payload sizes")
        if self.link_reps < 1 or self.reps < 1:
            raise ValueError("reps must be >= 1")
        if self.answer_prompts < 0:
            raise ValueError("answer_prompts must be >= 0")
        if len(set(self.prompt_tokens)) < 2 or min(self.prompt_tokens) < 1:
            raise ValueError("need at least two distinct positive prompt lengths")
        if self.max_tokens < 2:
            raise ValueError("max_tokens must be >= 2 (decode needs more than the first token)")
        if not self.max_rtt_s > 0 or not self.timeout_s > 0:
            raise ValueError("max_rtt_s and timeout_s must be > 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlmRun:
    """One device-SLM answer from a cold cache, in PROFILE.json's ``fit.slm_runs``.

    ``prefill_tokens`` is what the SLM prefilled (template included);
    ``prompt_tokens``/``output_tokens`` count the message text and the answer.
    """

    prefill_tokens: int
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    output_tokens: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EdgeRun:
    """One edge answer in a new session, timed by the edge (``fit.edge_runs``,
    ``fit.edge_answer_runs``); token counts as in :class:`SlmRun`, in device-SLM
    tokens, and the edge's own counts under ``edge_*``."""

    edge_prefill_tokens: int
    prefill_s: float
    decode_s: float
    server_ttft_s: float
    edge_output_tokens: int
    prompt_tokens: int
    output_tokens: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: One answer to a prompt: (its text, the run record).
Answerer = Callable[[str], tuple[str, SlmRun | EdgeRun]]


@dataclass(frozen=True)
class GammaFit:
    """γ of one model (eqs. 1, 5), s/token, from :func:`_gamma_runs`."""

    prefill: float
    decode: float
    #: The per-call prefill time eq. (1) leaves out (template tokens, graph
    #: setup): median over runs of what γ_prefill · tokens does not explain.
    prefill_fixed_s: float
    runs: tuple[SlmRun | EdgeRun, ...]


@dataclass(frozen=True)
class AnswerLengths:
    """L̄_r of one model: its answers' lengths to real prompts (device-SLM tokens)."""

    lengths: tuple[int, ...]
    runs: tuple[SlmRun | EdgeRun, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.lengths)


@dataclass(frozen=True)
class LinkDirection:
    """One direction's Echo fit, or, when the fit failed, a fallback estimate."""

    overhead_s: float
    bandwidth_bytes_per_s: float
    fit: LinkFit | None = None
    error: str | None = None
    n_samples: int = 0

    @property
    def ok(self) -> bool:
        return self.fit is not None

    def to_dict(self) -> dict:
        if self.fit is not None:
            return {"ok": True, **self.fit.to_dict()}
        return {
            "ok": False, "error": self.error, "overhead_s": self.overhead_s,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "n_samples": self.n_samples,
        }


@dataclass(frozen=True)
class LinkProfile:
    up: LinkDirection
    down: LinkDirection

    @property
    def overhead_s(self) -> float:
        return (self.up.overhead_s + self.down.overhead_s) / 2

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """One B serves uploads and downloads in eq. (3): the harmonic mean is
        the rate a transfer split evenly between the two directions sees."""
        return 2.0 / (1.0 / self.up.bandwidth_bytes_per_s + 1.0 / self.down.bandwidth_bytes_per_s)

    @property
    def failed(self) -> list[str]:
        return [d for d, r in (("up", self.up), ("down", self.down)) if not r.ok]

    def to_dict(self) -> dict:
        return {"up": self.up.to_dict(), "down": self.down.to_dict()}


@dataclass(frozen=True)
class RouterTiming:
    tau_r: float
    seconds: tuple[float, ...]
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Measurements:
    """What :func:`run_profile` measured; None for a part that was not."""

    n_texts: int
    bytes_per_token: float
    n_prompts: int = 0
    slm: GammaFit | None = None
    slm_answers: AnswerLengths | None = None
    router: RouterTiming | None = None
    #: Why the router was not timed, when it was asked for and could not be built.
    router_error: str | None = None
    edge: GammaFit | None = None
    edge_answers: AnswerLengths | None = None
    link: LinkProfile | None = None


# --- text ------------------------------------------------------------------------------------


def text_of_tokens(texts: Sequence[str], n_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """A prompt of about ``n_tokens`` tokens made of real text (cut at a word)."""
    words: list[str] = []
    for text in texts:
        words += text.split()
        if count_tokens(" ".join(words)) >= n_tokens:
            break
    lo, hi = 1, len(words)
    while lo < hi:  # the shortest word prefix reaching n_tokens
        mid = (lo + hi) // 2
        if count_tokens(" ".join(words[:mid])) >= n_tokens:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(words[:lo])


# --- measurements ----------------------------------------------------------------------------


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a log, a test's pipe).
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)


def measure_link(ping: Callable[[int, int], float], settings: ProfileSettings, direction: str) -> tuple[list[int], list[float]]:
    """Echo round trips for each payload size in one direction ("up" or "down")."""
    sizes_out: list[int] = []
    rtts: list[float] = []
    sizes = sorted(set(settings.sizes_bytes))
    with _progress(len(sizes) * settings.link_reps, f"link {direction}") as bar:
        for size in sizes:
            call = (lambda: ping(size, 0)) if direction == "up" else (lambda: ping(0, size))
            call()  # warm-up: connection, buffers
            got = []
            for _ in range(settings.link_reps):
                got.append(call())
                bar.update()
            sizes_out += [size] * len(got)
            rtts += got
            if statistics.median(got) > settings.max_rtt_s and len(set(sizes_out)) >= 3:
                break
    return sizes_out, rtts


def _link_direction(sizes: list[int], rtts: list[float]) -> LinkDirection:
    from device_runtime.link.estimation import FitError, fit_link

    try:
        fit = fit_link(sizes, rtts)
        return LinkDirection(fit.overhead_s, fit.bandwidth_bytes_per_s, fit=fit)
    except FitError as exc:
        # An unshaped loopback: transfer time is lost in the noise.  Keep
        # the intercept and a lower bound on B from the largest payload.
        big = max(sizes)
        base = statistics.median(r for s, r in zip(sizes, rtts) if s == min(sizes))
        top = statistics.median(r for s, r in zip(sizes, rtts) if s == big)
        return LinkDirection(base, big / max(top - base, 1e-4), error=str(exc), n_samples=len(rtts))


def profile_link(client, settings: ProfileSettings) -> LinkProfile:
    """δ and B per direction from Echo round trips through ``client``."""
    up = _link_direction(*measure_link(client.ping, settings, "up"))
    down = _link_direction(*measure_link(client.ping, settings, "down"))
    return LinkProfile(up=up, down=down)


def _gamma_runs(run_one: Answerer, texts, settings: ProfileSettings, count_tokens, desc: str) -> GammaFit:
    """Shared by the SLM and the edge: per prompt length, ``reps`` answers."""
    runs = []
    # The first call pays one-off costs (buffers, caches, graph build) that no
    # later turn pays: run it once unrecorded.
    run_one(text_of_tokens(texts[-1:] + texts, min(settings.prompt_tokens), count_tokens))
    with _progress(len(settings.prompt_tokens) * settings.reps, desc) as bar:
        for i, n in enumerate(settings.prompt_tokens):
            for rep in range(settings.reps):
                # Each run starts from different text: the edge reuses KV by
                # prompt prefix across sessions, which would hide prefill time.
                k = (7 * (i * settings.reps + rep)) % len(texts)
                _, r = run_one(text_of_tokens(texts[k:] + texts[:k], n, count_tokens))
                runs.append(r)
                bar.update()
    return fit_gamma(runs, desc)


def fit_gamma(runs: Sequence[SlmRun | EdgeRun], desc: str = "γ") -> GammaFit:
    """γ prefill (the slope of prefill seconds against prompt tokens), γ decode
    (decode seconds per generated token after the first) and the fixed prefill
    part, from answers timed by the model that gave them (``edgeroute profile``'s
    sweep, or the self-profile's real prompts, :mod:`device_runtime.runtime.self_profile`)."""
    from device_runtime.link.estimation import per_token_time

    if not runs:
        raise ValueError(f"{desc}: no runs to fit")
    prefill_s = [r.prefill_s for r in runs]
    prefill_tok = [r.prompt_tokens for r in runs]
    # decode_s runs from the first token, so it times output - 1 steps.
    decoded = [(r.decode_s, r.output_tokens - 1) for r in runs if r.output_tokens >= 2]
    if not decoded:
        raise RuntimeError(f"{desc}: no run produced two or more tokens; cannot time decode")
    prefill = per_token_time(prefill_s, prefill_tok)
    return GammaFit(
        prefill=prefill,
        decode=sum(s for s, _ in decoded) / sum(n for _, n in decoded),
        prefill_fixed_s=statistics.median(s - prefill * t for s, t in zip(prefill_s, prefill_tok)),
        runs=tuple(runs),
    )


def mean_answer_tokens(answer: Answerer, prompts: Sequence[str], desc: str) -> AnswerLengths:
    """L̄_r: the lengths (device-SLM tokens) of one model's answers to ``prompts``;
    an empty answer counts 0."""
    runs, lengths = [], []
    with _progress(len(prompts), desc) as bar:
        for prompt in prompts:
            text, run = answer(prompt)
            runs.append(run)
            lengths.append(run.output_tokens if text else 0)
            bar.update()
    return AnswerLengths(lengths=tuple(lengths), runs=tuple(runs))


def call_time(runs: Sequence[SlmRun | EdgeRun], gamma_prefill: float, gamma_decode: float) -> float:
    """The per-call time the cost model leaves out (``ModelTiming.call_s``).

    The median over runs of what the model spent from the request to the last
    token (the edge's ``server_ttft_s + decode_s``, the SLM's ``prefill_s +
    decode_s``) minus what eqs. (1) and (5) charge for it, γ_p · L_p + γ_d · L_r,
    in the cost model's tokens; at least 0.
    """
    if not runs:
        raise ValueError("no runs to time")
    residuals = [
        _busy_s(r) - gamma_prefill * r.prompt_tokens - gamma_decode * r.output_tokens
        for r in runs
    ]
    return max(0.0, statistics.median(residuals))


def _busy_s(run: SlmRun | EdgeRun) -> float:
    if isinstance(run, EdgeRun):
        return run.server_ttft_s + run.decode_s
    return run.prefill_s + run.decode_s


def slm_answer(slm, settings: ProfileSettings, *, reset: bool = True) -> Answerer:
    """One answer from a cold cache (the whole prompt is prefilled): its text
    and the SLM's stats.  An empty text counts the SLM's own output tokens.

    ``reset=False`` keeps what the cache shares with the prompt (the system
    message and template head of an earlier answer), as a conversation's first
    turn finds it: the self-profile's runs are timed like the turns they predict."""

    def answer(prompt: str) -> tuple[str, SlmRun]:
        if reset:
            slm.reset()
        text = "".join(slm.stream([{"role": "user", "content": prompt}], max_tokens=settings.max_tokens, temperature=0.0))
        st = slm.last_stats
        return text, SlmRun(
            prefill_tokens=st.prefill_tokens, prefill_s=st.prefill_s, decode_s=st.decode_s,
            prompt_tokens=slm.count_tokens(prompt),
            output_tokens=slm.count_tokens(text) if text else st.output_tokens,
        )

    return answer


def edge_answer(client, settings: ProfileSettings, count_tokens: Callable[[str], int]) -> Answerer:
    """One answer in a new session (nothing cached on the edge): its text and
    the edge's own timings, counted in device-SLM tokens of the same text."""
    from device_runtime.link.edge_client import GenerationParams, new_session_id

    def answer(prompt: str) -> tuple[str, EdgeRun]:
        sid = new_session_id()
        try:
            res = client.generate(
                sid, [{"role": "user", "content": prompt}],
                GenerationParams(max_tokens=settings.max_tokens, temperature=0.0), open_session=True,
                timeout_s=settings.timeout_s,
            ).consume()
        finally:
            client.close_session(sid)
        return res.text, EdgeRun(
            edge_prefill_tokens=res.prefill_tokens, prefill_s=res.prefill_s, decode_s=res.decode_s,
            server_ttft_s=res.server_ttft_s or res.prefill_s, edge_output_tokens=res.output_tokens,
            prompt_tokens=count_tokens(prompt), output_tokens=count_tokens(res.text) if res.text else 0,
        )

    return answer


def profile_router(router, texts, settings: ProfileSettings, count_tokens) -> RouterTiming:
    from device_runtime.link.estimation import per_token_time

    seconds, tokens = [], []
    reps = max(3, settings.reps)
    with _progress(len(settings.prompt_tokens) * reps, "τ_r") as bar:
        for n in settings.prompt_tokens:
            prompt = text_of_tokens(texts, n, count_tokens)
            router.score(prompt)  # warm-up
            for _ in range(reps):
                t0 = time.perf_counter()
                router.score(prompt)
                seconds.append(time.perf_counter() - t0)
                tokens.append(count_tokens(prompt))
                bar.update()
    return RouterTiming(per_token_time(seconds, tokens), tuple(seconds), tuple(tokens))


def _time_router(texts, settings: ProfileSettings, count_tokens) -> tuple[RouterTiming | None, str | None]:
    """(τ_r timing, None), or (None, why) when the bundle cannot be loaded."""
    from device_runtime.routing.routers.base import ROUTERS, RouterError

    try:
        router = ROUTERS.create("bert", bundle=settings.bundle)
    except (RouterError, FileNotFoundError, ValueError) as exc:
        log.warning("router not profiled: %s", exc)
        return None, str(exc)
    return profile_router(router, texts, settings, count_tokens), None


def run_profile(
    settings: ProfileSettings, texts: Sequence[str], prompts: Sequence[str], *,
    security: "ChannelSecurity | None" = None,
) -> dict:
    """Measure the requested parts; returns the PROFILE.json object.

    ``texts``: real text for bytes per token and the γ/τ_r prompts;
    ``prompts``: real user prompts for the answer lengths L̄_r (may be empty);
    ``security``: TLS and the token for the edge (default: plaintext, none).
    """
    from device_runtime.link.estimation import bytes_per_token
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings

    texts = list(texts)
    slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(model_path=settings.slm_path, n_threads=settings.threads))
    client = None
    m: dict = {}
    try:
        count = slm.count_tokens
        bpt = bytes_per_token(texts, count)
        if "slm" in settings.parts:
            m["slm"] = _gamma_runs(slm_answer(slm, settings), texts, settings, count, "γ_s")
            if prompts:
                m["slm_answers"] = mean_answer_tokens(slm_answer(slm, settings), prompts, "L̄_r^s")
        if "router" in settings.parts:
            m["router"], m["router_error"] = _time_router(texts, settings, count)
        if "link" in settings.parts or "edge" in settings.parts:
            from device_runtime.link.edge_client import EdgeClient

            client = EdgeClient(
                settings.edge, security=security, timeout_s=settings.timeout_s, connect_timeout_s=10.0,
            )
        if "edge" in settings.parts:
            m["edge"] = _gamma_runs(edge_answer(client, settings, count), texts, settings, count, "γ_e")
            if prompts:
                m["edge_answers"] = mean_answer_tokens(edge_answer(client, settings, count), prompts, "L̄_r^e")
        if "link" in settings.parts:
            m["link"] = profile_link(client, settings)
    finally:
        if client is not None:
            client.close()
        slm.close()
    return assemble_profile(Measurements(n_texts=len(texts), bytes_per_token=bpt, n_prompts=len(prompts), **m), settings)


# --- PROFILE.json ----------------------------------------------------------------------------


def assemble_profile(m: Measurements, settings: ProfileSettings) -> dict:
    """The PROFILE.json object: measured values over the paper's Table I
    (mt-bench), ``sources`` saying which is which, the raw ``fit`` data and ``meta``."""
    from device_runtime.routing.cost_model import paper_params

    base = paper_params("mt-bench")
    profile: dict = {
        "gamma_s_prefill": base.gamma_s.prefill_s_per_token,
        "gamma_s_decode": base.gamma_s.decode_s_per_token,
        "gamma_e_prefill": base.gamma_e.prefill_s_per_token,
        "gamma_e_decode": base.gamma_e.decode_s_per_token,
        "tau_r": base.tau_r,
        "bandwidth_tokens_per_s": base.link.bandwidth_tokens_per_s,
        "overhead_s": base.link.overhead_s,
        "bytes_per_token": None,
    }
    sources = {k: "paper Table I" for k in profile}
    fit: dict = {}
    profile["bytes_per_token"] = m.bytes_per_token
    sources["bytes_per_token"] = f"device SLM tokenizer on {m.n_texts} texts"
    _add_slm(profile, sources, fit, m)
    if m.router is not None:
        profile["tau_r"] = m.router.tau_r
        sources["tau_r"] = "measured (bert)"
        fit["router"] = {"seconds": list(m.router.seconds), "tokens": list(m.router.tokens)}
    elif m.router_error is not None:
        sources["tau_r"] = f"not measured: {m.router_error}"
    _add_edge(profile, sources, fit, m)
    _add_link(profile, sources, fit, m)
    profile["fit"] = fit
    profile["sources"] = sources
    profile["meta"] = {
        "edge": settings.edge,
        "token_unit": "device-SLM tokens of the message text",
        "prompt_tokens": list(settings.prompt_tokens),
        "max_tokens": settings.max_tokens,
        "reps": settings.reps,
        "answer_prompts": m.n_prompts,
        "link_reps": settings.link_reps,
    }
    return profile


def _add_slm(profile: dict, sources: dict, fit: dict, m: Measurements) -> None:
    if m.slm is None:
        return
    profile["gamma_s_prefill"], profile["gamma_s_decode"] = m.slm.prefill, m.slm.decode
    sources["gamma_s_prefill"] = sources["gamma_s_decode"] = "measured"
    fit["slm_runs"] = [r.to_dict() for r in m.slm.runs]
    fit["slm_prefill_fixed_s"] = m.slm.prefill_fixed_s
    if m.slm_answers is not None:
        profile["response_tokens_device"] = m.slm_answers.mean
        sources["response_tokens_device"] = f"measured ({m.n_prompts} real prompts)"
        fit["slm_answer_tokens"] = list(m.slm_answers.lengths)


def _add_edge(profile: dict, sources: dict, fit: dict, m: Measurements) -> None:
    if m.edge is None:
        return
    profile["gamma_e_prefill"], profile["gamma_e_decode"] = m.edge.prefill, m.edge.decode
    sources["gamma_e_prefill"] = sources["gamma_e_decode"] = "measured (edge-reported timings)"
    fit["edge_runs"] = [r.to_dict() for r in m.edge.runs]
    fit["edge_prefill_fixed_s"] = m.edge.prefill_fixed_s
    timed = list(m.edge.runs)
    if m.edge_answers is not None:
        profile["response_tokens_edge"] = m.edge_answers.mean
        sources["response_tokens_edge"] = f"measured ({m.n_prompts} real prompts)"
        fit["edge_answer_tokens"] = list(m.edge_answers.lengths)
        fit["edge_answer_runs"] = [r.to_dict() for r in m.edge_answers.runs]
        timed += m.edge_answers.runs
    # Over the γ runs and the answers: the long prompts pin the slope,
    # the short real ones the fixed part.
    profile["call_s_edge"] = call_time(timed, m.edge.prefill, m.edge.decode)
    sources["call_s_edge"] = f"measured (edge-reported timings, {len(timed)} calls)"


def _add_link(profile: dict, sources: dict, fit: dict, m: Measurements) -> None:
    if m.link is None:
        return
    b_bytes = m.link.bandwidth_bytes_per_s
    profile["overhead_s"] = m.link.overhead_s
    profile["bandwidth_tokens_per_s"] = b_bytes / profile["bytes_per_token"]
    profile["bandwidth_bytes_per_s"] = b_bytes
    failed = m.link.failed
    sources["overhead_s"] = sources["bandwidth_tokens_per_s"] = (
        "measured (Echo fit)" if not failed else
        f"estimated: the {' and '.join(failed)} fit failed; δ from the smallest payload's RTT, "
        "B from the largest payload's extra time (see fit.link)"
    )
    fit["link"] = m.link.to_dict()
