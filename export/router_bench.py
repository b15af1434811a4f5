"""The router benchmark: FP32 ONNX vs INT8 ONNX vs PyTorch.

Measures, on one thread: model latency (p50/p95 of single-turn calls at fixed
token lengths), tokenization time, model size, and validation APGR / CPT per
benchmark.  Prints tables for docs/router.md; nothing here is asserted by tests.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from device_runtime.routing.bundle import Bundle, BundleError, encode_turn, load_bundle


class BenchError(RuntimeError):
    """The benchmark cannot run on this bundle / installation."""


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _feeds_of_length(router, text_ids: list[int], length: int) -> dict[str, np.ndarray]:
    """One turn of exactly ``length`` tokens ([CLS] real text ids [SEP]), batch 1."""
    tok = router.tokenizer
    specials = tok.num_special_tokens_to_add(False)
    body = (text_ids * (length // max(1, len(text_ids)) + 1))[: length - specials]
    enc = tok.post_process(tok.encode(tok.decode(body), add_special_tokens=False), None, True)
    ids = list(enc.ids)[:length]
    # Decoding and re-encoding can change the count by a token or two: pad/trim with body ids.
    while len(ids) < length:
        ids.insert(-1, body[len(ids) % len(body)])
    feeds = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, length), dtype=np.int64),
        "token_type_ids": np.zeros((1, length), dtype=np.int64),
    }
    feeds = {k: v for k, v in feeds.items() if k in router.manifest.inputs}
    if "lp" in router.manifest.inputs:
        feeds["lp"] = np.asarray([[router.manifest.lp_feature.value("w " * int(length * 0.75))]], dtype=np.float32)
    return feeds


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first call allocates
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _full_bundle(bundle_dir: str | Path) -> Bundle:
    """The bundle, which must be a full export (the FP32 model is one of the columns)."""
    try:
        bundle: Bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        raise BenchError(str(exc)) from exc
    if not bundle.fp32_model_path.is_file():
        raise BenchError(
            f"{bundle.directory} has no {bundle.fp32_model_path.name}: the benchmark needs a full "
            "export directory (edgeroute export --out DIR), not the shipped INT8-only bundle"
        )
    return bundle


def _onnx_routers(bundle: Bundle) -> dict:
    """The device scorer on one thread, batch 1, per precision."""
    from device_runtime.routing.routers.base import RouterError
    from device_runtime.routing.routers.bert import BertRouter

    try:
        return {
            "onnx_fp32": BertRouter(bundle.directory, threads=1, fp32=True, batch_size=1),
            "onnx_int8": BertRouter(bundle.directory, threads=1, batch_size=1),
        }
    except RouterError as exc:
        raise BenchError(str(exc)) from None


def _torch_model(ckpt: Path, bundle: Bundle):
    """The trained PyTorch checkpoint of the export, on one thread."""
    if not ckpt.is_dir():
        raise BenchError(f"{bundle.directory} has no pytorch/ checkpoint (pass --no-pytorch)")
    try:
        import torch

        from export.model import load_checkpoint
    except ImportError as exc:
        raise BenchError(f"the PyTorch column needs the export extra: {exc}") from exc
    torch.set_num_threads(1)
    try:
        return load_checkpoint(ckpt)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BenchError(f"cannot load the PyTorch checkpoint in {ckpt}: {type(exc).__name__}: {exc}") from None


def _examples_for(bundle: Bundle, data_dir, quality: bool) -> list:
    """Validation turns: for the quality rows, and as real text for the latency
    inputs (none, without the quality rows, when the data cannot be loaded)."""
    try:
        return _val_examples(bundle, data_dir)
    except BenchError:
        if quality:
            raise
        return []


def _p50_p95(times: Sequence[float]) -> dict[str, float]:
    return {"p50": 1e3 * _percentile(times, 50), "p95": 1e3 * _percentile(times, 95)}


def _torch_forward(model, args) -> None:
    import torch

    with torch.no_grad():
        model(*args)


def _latency(routers: dict, torch_model, bundle: Bundle, text_ids: list[int], lengths: Sequence[int],
             repeats: int) -> dict[str, dict]:
    """p50/p95 of single-turn model calls per token length and precision (ms)."""
    out: dict[str, dict] = {}
    for n in lengths:
        feeds = _feeds_of_length(routers["onnx_int8"], text_ids, n)
        row = {}
        for name, router in routers.items():
            times = _time(partial(router.session.run, [router._output], feeds), repeats)
            row[name] = _p50_p95(times)
        if torch_model is not None:
            import torch

            args = [torch.from_numpy(feeds[k]) for k in bundle.manifest.inputs]
            row["pytorch"] = _p50_p95(_time(partial(_torch_forward, torch_model, args), repeats))
        out[str(n)] = row
    return out


def _tokenize_ms(router, turns, max_len: int) -> dict:
    """encode_turn (tokenizers, the device path) timed per turn."""
    tok_times = []
    for p, c in turns:
        t = time.perf_counter()
        encode_turn(router.tokenizer, p, c, max_len)
        tok_times.append(time.perf_counter() - t)
    return {**_p50_p95(tok_times), "turns": len(turns)}


def _sizes_mb(bundle: Bundle, ckpt: Path) -> dict[str, float]:
    sizes = {
        "onnx_int8": bundle.model_path.stat().st_size / 1e6,
        "onnx_fp32": bundle.fp32_model_path.stat().st_size / 1e6,
    }
    if ckpt.is_dir():
        sizes["pytorch"] = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 1e6
    return sizes


def _quality(routers: dict, torch_model, examples) -> tuple[dict, dict]:
    """Validation APGR / CPT per precision: on every distinct threshold, and on
    RouteLLM's 10 quantile bins."""
    from export.evaluate import metrics_by_benchmark

    scores_of = {}
    for name, router in routers.items():
        scores_of[name] = router.score_batch([(e.prompt, e.context) for e in examples]) if router.batch_size > 1 else [
            router.score(e.prompt, e.context) for e in _progress(examples, name)
        ]
    if torch_model is not None:
        scores_of["pytorch"] = _torch_scores(torch_model, routers["onnx_int8"], examples)
    fine = {name: metrics_by_benchmark(examples, scores) for name, scores in scores_of.items()}
    binned = {name: metrics_by_benchmark(examples, scores, bins=10) for name, scores in scores_of.items()}
    return fine, binned


def run_router_bench(
    bundle_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    repeats: int = 50,
    lengths: Sequence[int] = (32, 128, 512),
    pytorch: bool = True,
    quality: bool = True,
) -> dict:
    """Measure everything; returns a JSON-able dict (see :func:`format_tables`)."""
    if repeats < 1:
        raise BenchError("--repeats must be >= 1")
    bundle = _full_bundle(bundle_dir)
    max_len = bundle.manifest.max_length
    lengths = [n for n in lengths if n <= max_len] + [n for n in lengths if n > max_len and n <= 512]
    routers = _onnx_routers(bundle)
    ckpt = bundle.directory / "pytorch"
    torch_model = _torch_model(ckpt, bundle) if pytorch else None
    examples = _examples_for(bundle, data_dir, quality)
    sample_text = " ".join(e.prompt for e in examples[:50]) if examples else "the quick brown fox " * 200
    int8 = routers["onnx_int8"]
    text_ids = int8.tokenizer.encode(sample_text, add_special_tokens=False).ids or [0]

    result: dict = {"bundle": str(bundle.directory), "repeats": repeats, "threads": 1, "latency_ms": {},
                    "size_mb": {}, "quality": {}, "quality_routellm_bins": {}}
    result["latency_ms"] = _latency(routers, torch_model, bundle, text_ids, lengths, repeats)
    # Tokenization on real validation turns.
    turns = [(e.prompt, e.context) for e in examples[:500]] or [(sample_text[:500], ())]
    result["tokenize_ms"] = _tokenize_ms(int8, turns, max_len)
    result["size_mb"] = _sizes_mb(bundle, ckpt)
    if quality and examples:
        result["quality"], result["quality_routellm_bins"] = _quality(routers, torch_model, examples)
    return result


def _progress(items, name):
    from tqdm import tqdm

    return tqdm(items, desc=f"val scoring ({name})", leave=False, unit="turn")


def _torch_scores(model, router, examples) -> list[float]:
    import torch

    out = []
    with torch.no_grad():
        for e in _progress(examples, "pytorch"):
            feeds = router.feeds([(e.prompt, e.context)])
            out.append(float(model(*[torch.from_numpy(feeds[k]) for k in router.manifest.inputs])[0]))
    return out


def _val_examples(bundle: Bundle, data_dir):
    """The bundle's validation turns (its recorded split rule and benchmarks)."""
    from device_runtime.sim.traces import TraceError

    try:
        from export.config import default_data_dir
        from export.data import load_examples
    except ImportError:
        return []
    training = dict(bundle.manifest.training)
    dirs = [Path(data_dir)] if data_dir else [Path(d) for d in training.get("data_dirs", [])] or [default_data_dir()]
    benchmarks = [b for b in training.get("benchmarks", ["mmlu", "gsm8k"]) if b != "mt-bench"] or ["mmlu", "gsm8k"]
    try:
        examples = load_examples(dirs, benchmarks, val_fraction=float(training.get("val_fraction", 0.2)))
    except (TraceError, OSError) as exc:
        raise BenchError(f"cannot load validation data: {exc} (pass --data-dir)") from exc
    return [e for e in examples if e.split == "val"]


def format_tables(r: dict) -> str:
    """Markdown tables of a :func:`run_router_bench` result."""
    cols = [c for c in ("onnx_fp32", "onnx_int8", "pytorch") if any(c in row for row in r["latency_ms"].values())]
    lines = [f"Latency per turn, batch 1, {r['threads']} thread, {r['repeats']} runs (ms, p50 / p95)", ""]
    lines.append("| tokens | " + " | ".join(cols) + " | INT8 / FP32 (p50) |")
    lines.append("|---|" + "---|" * (len(cols) + 1))
    for n, row in r["latency_ms"].items():
        cells = [f"{row[c]['p50']:.2f} / {row[c]['p95']:.2f}" for c in cols]
        ratio = row["onnx_int8"]["p50"] / row["onnx_fp32"]["p50"]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    t = r["tokenize_ms"]
    lines += ["", f"Tokenization (tokenizers, prompt + history truncation): p50 {t['p50']:.3f} ms, "
              f"p95 {t['p95']:.3f} ms over {t['turns']} validation turns", ""]
    lines.append("| model | size (MB) |")
    lines.append("|---|---|")
    for k, v in r["size_mb"].items():
        lines.append(f"| {k} | {v:.1f} |")
    titles = {
        "quality": "Validation (split_of hash split), APGR / CPT(50%) / CPT(80%)",
        "quality_routellm_bins": "The same scores on RouteLLM's evaluation protocol (thresholds at 10 "
                                 "quantile bins of the scores), APGR / CPT(50%) / CPT(80%)",
    }
    for key, title in titles.items():
        if not r.get(key):
            continue
        lines += ["", title, ""]
        benches = sorted({b for q in r[key].values() for b in q})
        lines.append("| precision | " + " | ".join(benches) + " |")
        lines.append("|---|" + "---|" * len(benches))
        for prec, q in r[key].items():
            cells = []
            for b in benches:
                m = q.get(b)
                cells.append(f"{m['apgr']:.3f} / {100 * m['cpt50']:.1f}% / {100 * m['cpt80']:.1f}%" if m else "-")
            lines.append(f"| {prec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
