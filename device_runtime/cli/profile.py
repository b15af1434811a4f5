"""``edgeroute profile``: measure γ_s, γ_e, τ_r, B and δ and write PROFILE.json.

    edgeroute profile --edge HOST:PORT --out PROFILE.json [--json]

- γ_s (eqs. 1, 5): the device SLM answers prompts of several lengths; prefill
  γ is the slope of prefill seconds against prompt tokens, decode γ the
  decode seconds per generated token.
- γ_e: the same prompts on the edge, timed by the edge itself (the final
  message's ``prefill_s``/``decode_s``), so the link is not in it.
- τ_r (eq. 4): the router scores texts of several lengths; the slope of
  seconds against tokens.
- δ and B (eq. 3): Echo round trips with payloads of growing size, uplink and
  downlink, fitted as ``RTT = δ + size/B`` (:func:`~device_runtime.estimation.fit_link`).
  B is converted from bytes/s to tokens/s with the SLM tokenizer's
  bytes-per-token on real text.

Every count is in device-SLM tokens of the text, the unit the runtime's cost
model uses for L_p, C_t and ΔC (see :mod:`device_runtime.orchestrator`).
Parts can be skipped (``--parts``); a skipped part's keys keep the paper's
Table I values and ``sources`` says so.  With ``--json`` stdout carries only
the profile; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

PARTS = ("link", "edge", "slm", "router")
#: Payload sizes of the Echo sweep; larger ones are skipped once a round trip
#: exceeds ``max_rtt_s`` (a slow link needs no 1 MiB transfer to show its slope).
DEFAULT_SIZES = (0, 4096, 16384, 65536, 262144, 1048576)


@dataclass(frozen=True)
class ProfileSettings:
    """What ``edgeroute profile`` measures, and how much."""

    edge: str | None = None
    parts: tuple[str, ...] = PARTS
    sizes_bytes: tuple[int, ...] = DEFAULT_SIZES
    link_reps: int = 5
    """Round trips per payload size (plus one unrecorded warm-up)."""
    max_rtt_s: float = 1.5
    """Stop growing the payload once a size's median RTT exceeds this."""
    prompt_tokens: tuple[int, ...] = (32, 128, 384)
    """Prompt lengths for γ_s, γ_e and τ_r."""
    max_tokens: int = 32
    """Tokens generated per γ run (decode γ)."""
    reps: int = 2
    answer_prompts: int = 6
    """Real user prompts each model answers (up to ``max_tokens``) to measure its
    mean answer length L̄_r; 0 skips it."""
    data_dir: Path | None = None
    slm_path: str | None = None
    bundle: str | None = None
    threads: int | None = None
    timeout_s: float = 120.0

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


# --- text ---------------------------------------------------------------------------------


def sample_texts(data_dir: Path | None, limit: int = 400) -> list[str]:
    """Real text: MT-Bench-101 turns (user and reference answers) if ``data_dir``
    has them, else the team-written demo dialogues shipped with the package."""
    texts: list[str] = []
    path = data_dir / "mtbench101" / "mtbench101.jsonl" if data_dir else None
    if path is not None and path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                for turn in json.loads(line).get("history", []):
                    texts += [t for t in (turn.get("user"), turn.get("bot")) if t]
                if len(texts) >= limit:
                    break
        return texts[:limit]
    if data_dir is not None:
        log.warning("%s not found; using the package's demo dialogues for text", path)
    from device_runtime.dialogues import load_dialogues

    for item in load_dialogues():
        texts += list(item.prompts)
    return texts


def sample_prompts(data_dir: Path | None, n: int) -> list[str]:
    """``n`` real user prompts for answer lengths: the first user turn of ``n``
    MT-Bench-101 dialogues spread over the file, at a quarter-step offset (so
    not the evenly spread dialogues that ``scripts/bench_link.py`` replays),
    else the demo dialogues' prompts."""
    if n <= 0:
        return []
    path = data_dir / "mtbench101" / "mtbench101.jsonl" if data_dir else None
    if path is not None and path.is_file():
        with path.open(encoding="utf-8") as f:
            firsts = [next((t["user"] for t in json.loads(line).get("history", []) if t.get("user")), None)
                      for line in f if line.strip()]
        firsts = [t for t in firsts if t]
        if firsts:
            step = len(firsts) / n
            return [firsts[min(len(firsts) - 1, int((k + 0.25) * step))] for k in range(n)]
    from device_runtime.dialogues import load_dialogues

    prompts = [p for item in load_dialogues() for p in item.prompts]
    return prompts[:n]


def mean_answer_tokens(answer: Callable[[str], dict], prompts: Sequence[str], count_tokens, desc: str) -> dict:
    """L̄_r: the mean length (device-SLM tokens) of one model's answers to ``prompts``.

    ``answer(prompt)`` returns a run record with the answer's ``text``; the
    records, with ``prompt_tokens`` and ``output_tokens`` filled in, are
    returned as ``runs``."""
    runs = []
    with _progress(len(prompts), desc) as bar:
        for prompt in prompts:
            run = answer(prompt)
            text = run.pop("text")
            runs.append({**run, "prompt_tokens": count_tokens(prompt),
                         "output_tokens": count_tokens(text) if text else 0})
            bar.update()
    lengths = [r["output_tokens"] for r in runs]
    return {"mean": statistics.fmean(lengths), "lengths": lengths, "runs": runs}


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

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


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


def profile_link(client, settings: ProfileSettings) -> dict:
    from device_runtime.estimation import FitError, fit_link

    out: dict = {}
    for direction in ("up", "down"):
        sizes, rtts = measure_link(client.ping, settings, direction)
        try:
            fit = fit_link(sizes, rtts)
            out[direction] = {"ok": True, **fit.to_dict()}
        except FitError as exc:
            # An unshaped loopback: transfer time is lost in the noise.  Keep
            # the intercept and a lower bound on B from the largest payload.
            big = max(sizes)
            base = statistics.median(r for s, r in zip(sizes, rtts) if s == min(sizes))
            top = statistics.median(r for s, r in zip(sizes, rtts) if s == big)
            out[direction] = {
                "ok": False, "error": str(exc), "overhead_s": base,
                "bandwidth_bytes_per_s": big / max(top - base, 1e-4), "n_samples": len(rtts),
            }
    return out


def _gamma_runs(run_one, texts, settings: ProfileSettings, count_tokens, desc: str) -> dict:
    """Shared by the SLM and the edge: per prompt length, ``reps`` answers."""
    from device_runtime.estimation import per_token_time

    prefill_s, prefill_tok, decode_s, decode_tok = [], [], [], []
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
                prompt = text_of_tokens(texts[k:] + texts[:k], n, count_tokens)
                r = run_one(prompt)
                runs.append(r)
                prefill_s.append(r["prefill_s"])
                prefill_tok.append(r["prompt_tokens"])
                # decode_s runs from the first token, so it times output - 1 steps.
                if r["output_tokens"] >= 2:
                    decode_s.append(r["decode_s"])
                    decode_tok.append(r["output_tokens"] - 1)
                bar.update()
    if not decode_tok:
        raise RuntimeError(f"{desc}: no run produced two or more tokens; cannot time decode")
    prefill = per_token_time(prefill_s, prefill_tok)
    return {
        "prefill": prefill,
        "decode": sum(decode_s) / sum(decode_tok),
        # What eq. (1) leaves out: the per-call prefill time not explained by
        # the text's tokens (template tokens, graph setup), median over runs.
        "prefill_fixed_s": statistics.median(s - prefill * t for s, t in zip(prefill_s, prefill_tok)),
        "runs": runs,
    }


def call_time(runs: Sequence[dict], gamma_prefill: float, gamma_decode: float) -> float:
    """The per-call time the cost model leaves out (``ModelTiming.call_s``).

    The median over runs of what the server spent from the request to the last
    token (``server_ttft_s + decode_s``) minus what eqs. (1) and (5) charge for
    it, γ_p · L_p + γ_d · L_r, in the cost model's tokens; at least 0.
    """
    if not runs:
        raise ValueError("no runs to time")
    residuals = [
        r["server_ttft_s"] + r["decode_s"] - gamma_prefill * r["prompt_tokens"] - gamma_decode * r["output_tokens"]
        for r in runs
    ]
    return max(0.0, statistics.median(residuals))


def slm_answer(slm, settings: ProfileSettings) -> Callable[[str], dict]:
    """One answer from a cold cache (the whole prompt is prefilled): its
    ``text`` and the SLM's stats."""

    def answer(prompt: str) -> dict:
        slm.reset()
        text = "".join(slm.stream([{"role": "user", "content": prompt}], max_tokens=settings.max_tokens, temperature=0.0))
        st = slm.last_stats
        return {"text": text, "prefill_tokens": st.prefill_tokens, "prefill_s": st.prefill_s,
                "decode_s": st.decode_s, "slm_output_tokens": st.output_tokens}

    return answer


def profile_slm(slm, texts, settings: ProfileSettings) -> dict:
    answer = slm_answer(slm, settings)

    def run_one(prompt: str) -> dict:
        r = answer(prompt)
        text = r.pop("text")
        out = r.pop("slm_output_tokens")
        return {**r, "prompt_tokens": slm.count_tokens(prompt),
                "output_tokens": slm.count_tokens(text) if text else out}

    return _gamma_runs(run_one, texts, settings, slm.count_tokens, "γ_s")


def edge_answer(client, settings: ProfileSettings) -> Callable[[str], dict]:
    """One answer in a new session (nothing cached on the edge): its ``text``
    and the edge's own timings and token counts."""
    from device_runtime.edge_client import GenerationParams, new_session_id

    def answer(prompt: str) -> dict:
        sid = new_session_id()
        try:
            res = client.generate(
                sid, [{"role": "user", "content": prompt}],
                GenerationParams(max_tokens=settings.max_tokens, temperature=0.0), open_session=True,
            ).consume()
        finally:
            client.close_session(sid)
        return {"text": res.text, "edge_prefill_tokens": res.prefill_tokens, "prefill_s": res.prefill_s,
                "decode_s": res.decode_s, "server_ttft_s": res.server_ttft_s or res.prefill_s,
                "edge_output_tokens": res.output_tokens}

    return answer


def profile_edge(client, texts, settings: ProfileSettings, count_tokens) -> dict:
    answer = edge_answer(client, settings)

    def run_one(prompt: str) -> dict:
        r = answer(prompt)
        text = r.pop("text")
        # Edge timings, counted in device-SLM tokens of the same text.
        return {**r, "prompt_tokens": count_tokens(prompt), "output_tokens": count_tokens(text) if text else 0}

    return _gamma_runs(run_one, texts, settings, count_tokens, "γ_e")


def profile_router(router, texts, settings: ProfileSettings, count_tokens) -> dict:
    from device_runtime.estimation import per_token_time

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
    return {"tau_r": per_token_time(seconds, tokens), "seconds": seconds, "tokens": tokens}


def run_profile(settings: ProfileSettings) -> dict:
    """Measure the requested parts; returns the PROFILE.json object."""
    from device_runtime.cost_model import paper_params
    from device_runtime.estimation import bytes_per_token
    from device_runtime.slm import SLMSettings, create_slm

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
    texts = sample_texts(settings.data_dir)
    prompts = sample_prompts(settings.data_dir, settings.answer_prompts)
    slm = create_slm("llama-cpp", SLMSettings(model_path=settings.slm_path, n_threads=settings.threads))
    client = None
    try:
        count = slm.count_tokens
        profile["bytes_per_token"] = bytes_per_token(texts, count)
        sources["bytes_per_token"] = f"device SLM tokenizer on {len(texts)} texts"
        if "slm" in settings.parts:
            g = profile_slm(slm, texts, settings)
            profile["gamma_s_prefill"], profile["gamma_s_decode"] = g["prefill"], g["decode"]
            sources["gamma_s_prefill"] = sources["gamma_s_decode"] = "measured"
            fit["slm_runs"] = g["runs"]
            fit["slm_prefill_fixed_s"] = g["prefill_fixed_s"]
            if prompts:
                a = mean_answer_tokens(slm_answer(slm, settings), prompts, count, "L̄_r^s")
                profile["response_tokens_device"] = a["mean"]
                sources["response_tokens_device"] = f"measured ({len(prompts)} real prompts)"
                fit["slm_answer_tokens"] = a["lengths"]
        if "router" in settings.parts:
            from device_runtime.routers.base import RouterError, create_router

            try:
                router = create_router("bert", bundle=settings.bundle)
            except (RouterError, FileNotFoundError, ValueError) as exc:
                log.warning("router not profiled: %s", exc)
                sources["tau_r"] = f"not measured: {exc}"
            else:
                r = profile_router(router, texts, settings, count)
                profile["tau_r"] = r["tau_r"]
                sources["tau_r"] = "measured (bert)"
                fit["router"] = {"seconds": r["seconds"], "tokens": r["tokens"]}
        if "link" in settings.parts or "edge" in settings.parts:
            from device_runtime.edge_client import EdgeClient

            client = EdgeClient(settings.edge, timeout_s=settings.timeout_s, connect_timeout_s=10.0)
        if "edge" in settings.parts:
            g = profile_edge(client, texts, settings, count)
            profile["gamma_e_prefill"], profile["gamma_e_decode"] = g["prefill"], g["decode"]
            sources["gamma_e_prefill"] = sources["gamma_e_decode"] = "measured (edge-reported timings)"
            fit["edge_runs"] = g["runs"]
            fit["edge_prefill_fixed_s"] = g["prefill_fixed_s"]
            timed = list(g["runs"])
            if prompts:
                a = mean_answer_tokens(edge_answer(client, settings), prompts, count, "L̄_r^e")
                profile["response_tokens_edge"] = a["mean"]
                sources["response_tokens_edge"] = f"measured ({len(prompts)} real prompts)"
                fit["edge_answer_tokens"] = a["lengths"]
                fit["edge_answer_runs"] = a["runs"]
                timed += a["runs"]
            # Over the γ runs and the answers: the long prompts pin the slope,
            # the short real ones the fixed part.
            profile["call_s_edge"] = call_time(timed, g["prefill"], g["decode"])
            sources["call_s_edge"] = f"measured (edge-reported timings, {len(timed)} calls)"
        if "link" in settings.parts:
            link = profile_link(client, settings)
            up, down = link["up"]["bandwidth_bytes_per_s"], link["down"]["bandwidth_bytes_per_s"]
            # One B serves uploads and downloads in eq. (3): the harmonic mean is
            # the rate a transfer split evenly between the two directions sees.
            b_bytes = 2.0 / (1.0 / up + 1.0 / down)
            profile["overhead_s"] = (link["up"]["overhead_s"] + link["down"]["overhead_s"]) / 2
            profile["bandwidth_tokens_per_s"] = b_bytes / profile["bytes_per_token"]
            profile["bandwidth_bytes_per_s"] = b_bytes
            failed = [d for d in ("up", "down") if not link[d]["ok"]]
            sources["overhead_s"] = sources["bandwidth_tokens_per_s"] = (
                "measured (Echo fit)" if not failed else
                f"estimated: the {' and '.join(failed)} fit failed; δ from the smallest payload's RTT, "
                "B from the largest payload's extra time (see fit.link)"
            )
            fit["link"] = link
    finally:
        if client is not None:
            client.close()
        slm.close()
    profile["fit"] = fit
    profile["sources"] = sources
    profile["meta"] = {
        "edge": settings.edge,
        "token_unit": "device-SLM tokens of the message text",
        "prompt_tokens": list(settings.prompt_tokens),
        "max_tokens": settings.max_tokens,
        "reps": settings.reps,
        "answer_prompts": len(prompts),
        "link_reps": settings.link_reps,
    }
    return profile


# --- CLI ------------------------------------------------------------------------------------------


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="measure γ_s, γ_e, τ_r, B and δ; write PROFILE.json",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--edge", metavar="HOST:PORT", help="edge service (needed for the link and edge parts)")
    p.add_argument("--out", metavar="PROFILE.json", help="where to write the profile")
    p.add_argument("--json", action="store_true", help="print the profile on stdout, nothing else")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--sizes", type=_ints, default=DEFAULT_SIZES, help="Echo payload sizes in bytes")
    p.add_argument("--link-reps", type=int, default=5, help="round trips per payload size")
    p.add_argument("--max-rtt", type=float, default=1.5, help="stop growing payloads past this RTT (s)")
    p.add_argument("--prompt-tokens", type=_ints, default=(32, 128, 384), help="prompt lengths for γ and τ_r")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per γ run")
    p.add_argument("--reps", type=int, default=2, help="runs per prompt length")
    p.add_argument("--answer-prompts", type=int, default=6,
                   help="real user prompts each model answers, up to --max-tokens, for its mean answer "
                        "length L̄_r (0: skip; give the --max-tokens the runtime uses)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="shared data dir with mtbench101/ (real text for bytes-per-token); default: the demo dialogues")
    p.add_argument("--slm", metavar="GGUF", help="device SLM (default: SmolLM2-135M-Instruct)")
    p.add_argument("--bundle", metavar="DIR", help="router bundle (default: the shipped one)")
    p.add_argument("--threads", type=int, default=None, help="device SLM CPU threads")
    p.add_argument("--timeout", type=float, default=120.0, help="edge call deadline (s)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.json:
        print("edgeroute profile: give --out PROFILE.json and/or --json", file=sys.stderr)
        return 2
    if args.out:
        # Before minutes of measuring: a path that cannot be written fails now.
        out = Path(args.out)
        try:
            if out.is_dir():
                raise IsADirectoryError(21, "is a directory")
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"edgeroute profile: cannot write --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        settings = ProfileSettings(
            edge=args.edge, parts=tuple(x.strip() for x in args.parts.split(",") if x.strip()),
            sizes_bytes=tuple(args.sizes), link_reps=args.link_reps, max_rtt_s=args.max_rtt,
            prompt_tokens=tuple(args.prompt_tokens), max_tokens=args.max_tokens, reps=args.reps,
            answer_prompts=args.answer_prompts,
            data_dir=args.data_dir, slm_path=args.slm, bundle=args.bundle, threads=args.threads,
            timeout_s=args.timeout,
        )
    except ValueError as exc:
        print(f"edgeroute profile: {exc}", file=sys.stderr)
        return 2
    from device_runtime.edge_client import EdgeError, EdgeUnavailable
    from device_runtime.models import ModelNotFoundError
    from device_runtime.profile import write_profile

    try:
        profile = run_profile(settings)
    except EdgeUnavailable as exc:
        print(f"edgeroute profile: the edge at {settings.edge} is unreachable: {exc}", file=sys.stderr)
        return 1
    except (EdgeError, ModelNotFoundError, RuntimeError) as exc:
        print(f"edgeroute profile: {exc}", file=sys.stderr)
        return 1
    rc = 0
    if args.out:
        try:
            path = write_profile(args.out, profile)
            log.info("wrote %s", path)
        except OSError as exc:  # e.g. the disk filled up meanwhile: keep the --json output
            print(f"edgeroute profile: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            rc = 1
    summary = {k: profile[k] for k in ("gamma_s_prefill", "gamma_s_decode", "gamma_e_prefill",
                                       "gamma_e_decode", "tau_r", "bandwidth_tokens_per_s",
                                       "overhead_s", "bytes_per_token")}
    for k, v in summary.items():
        print(f"{k:>24} = {v:.6g}   ({profile['sources'][k]})", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(profile) + "\n")
    return rc
