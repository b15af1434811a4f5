"""Training examples for the router, from the RouteLLM traces (device_runtime.sim.traces).

Label ("gain"): y = (q_edge - q_device + 1) / 2 with both qualities in [0, 1]
(correctness for MMLU/GSM8K; MT-Bench judge scores 1-10 mapped by (s - 1) / 9).
y = 1 when only the edge is right, 0 when only the device is, 1/2 when they
agree.  A model trained on it with cross-entropy estimates the expected
quality the edge adds, which is what the APGR/CPT curves rank turns by.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from device_runtime.sim.traces import SUBDIRS, load_trace, split_of

#: The split rule recorded in the manifest (simulate --split uses the same one).
SPLIT_RULE = (
    "device_runtime.sim.traces.split_of(first prompt of the dialogue, val_fraction): "
    "sha256(prompt)[:8] as int % 10000 < val_fraction * 10000 -> val"
)


@dataclass(frozen=True)
class Example:
    benchmark: str
    domain: str
    prompt: str
    context: tuple[dict, ...]
    quality_device: float
    quality_edge: float
    label: float
    split: str
    weight: float


def normalized_quality(benchmark: str, q: float) -> float:
    """Quality in [0, 1]: correctness as is, MT-Bench judge scores (1-10) by (s - 1) / 9."""
    if benchmark == "mt-bench":
        return min(1.0, max(0.0, (q - 1.0) / 9.0))
    return float(q)


def gain_label(benchmark: str, q_device: float, q_edge: float) -> float:
    return (normalized_quality(benchmark, q_edge) - normalized_quality(benchmark, q_device) + 1.0) / 2.0


def load_examples(
    data_dirs: Sequence[Path],
    benchmarks: Sequence[str],
    *,
    val_fraction: float,
    weights: dict[str, float] | None = None,
) -> list[Example]:
    """Every decontaminated turn of ``benchmarks`` in ``data_dirs``, labelled and split."""
    weights = weights or {}
    out: list[Example] = []
    for data_dir in data_dirs:
        for bench in benchmarks:
            for d in load_trace(bench, data_dir):
                split = split_of(d.turns[0].prompt, val_fraction)
                for t in d.turns:
                    out.append(
                        Example(
                            benchmark=bench,
                            domain=d.domain,
                            prompt=t.prompt,
                            context=tuple(dict(m) for m in t.context),
                            quality_device=t.quality_device,
                            quality_edge=t.quality_edge,
                            label=gain_label(bench, t.quality_device, t.quality_edge),
                            split=split,
                            weight=float(weights.get(bench, 1.0)),
                        )
                    )
    return out


def data_hashes(data_dirs: Sequence[Path], benchmarks: Sequence[str]) -> dict[str, str]:
    """sha256 of every file the training read, keyed by ``<dir name>/<sub>/<file>``."""
    hashes: dict[str, str] = {}
    for data_dir in data_dirs:
        for bench in benchmarks:
            sub = Path(data_dir) / SUBDIRS[bench]
            for path in sorted(p for p in sub.iterdir() if p.is_file()):
                h = hashlib.sha256()
                with path.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                hashes[f"{Path(data_dir).name}/{SUBDIRS[bench]}/{path.name}"] = h.hexdigest()
    return hashes
