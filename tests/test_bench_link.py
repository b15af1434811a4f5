"""scripts/bench_link.py's summary, table, plot and flags on hand-made records (no root, no models)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _scripts import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_link.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_link")


def rec(target: str, measured: float, dev: float, edge: float, posthoc: float | None = None,
        fallback: bool = False) -> dict:
    r = {"target": target, "measured_s": measured, "predicted_s": {"device": dev, "edge": edge},
         "fallback": fallback}
    if posthoc is not None:
        r["predicted_posthoc_s"] = posthoc
    return r


RECORDS = [
    rec("edge", 1.0, 0.5, 2.0, posthoc=1.1),   # live err 100%, post-hoc 10%
    rec("edge", 2.0, 0.5, 3.0, posthoc=1.6),   # 50%, 20%
    rec("edge", 1.0, 0.5, 1.5, posthoc=1.3),   # 50%, 30%
    rec("device", 0.5, 0.4, 9.0, posthoc=0.5),  # 20%, 0%
    rec("device", 0.8, 0.4, 9.0),               # 50%, no post-hoc key (older record)
    rec("device", 3.0, 0.4, 0.1, fallback=True),  # a fallback counts for neither target
]


def test_summarize_live_and_post_hoc_errors_over_the_served_turns(bench):
    s = bench.summarize(RECORDS)
    assert s["turns"] == 6 and s["fallbacks"] == 1 and s["edge_share"] == pytest.approx(0.5)
    assert s["pred_err_edge"] == pytest.approx(0.5) and s["n_edge"] == 3
    assert s["pred_err_posthoc_edge"] == pytest.approx(0.2) and s["n_posthoc_edge"] == 3
    assert s["pred_err_device"] == pytest.approx(0.35) and s["n_device"] == 2
    assert s["pred_err_posthoc_device"] == pytest.approx(0.0) and s["n_posthoc_device"] == 1
    only_edge = bench.summarize(RECORDS[:3])
    assert only_edge["pred_err_device"] is None and only_edge["pred_err_posthoc_device"] is None
    assert only_edge["n_posthoc_device"] == 0


def test_table_has_a_post_hoc_column_per_target(bench):
    results = {"links": {"poor": {"summary": {"edge": bench.summarize(RECORDS)}}}}
    lines = bench.table(results).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-4:] == ["pred. err device (n)", "pred. err device (post-hoc) (n)",
                           "pred. err edge (n)", "pred. err edge (post-hoc) (n)"]
    assert lines[1].count("---") == len(header)
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(row) == len(header)
    assert row[:2] == ["poor", "edge"]
    assert row[-4:] == ["35% (2)", "0% (1)", "50% (3)", "20% (3)"]
    # A summary written before the post-hoc keys existed still prints.
    old = {k: v for k, v in bench.summarize(RECORDS).items() if "posthoc" not in k}
    row = bench.table({"links": {"poor": {"summary": {"edge": old}}}}).splitlines()[2]
    assert row.rstrip().endswith("| 35% (2) | - (0) | 50% (3) | - (0) |")


def test_prediction_plot_with_post_hoc_points(bench, tmp_path):
    pytest.importorskip("matplotlib")
    summary = bench.summarize(RECORDS)
    results = {"policies": ["edge"], "links": {"poor": {"summary": {"edge": summary},
                                                        "records": {"edge": RECORDS}}}}
    paths = bench.plot(results, tmp_path)
    assert [p.name for p in paths] == ["link_latency.png", "link_prediction.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_help_lists_alpha_and_bad_alpha_is_refused():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--alpha" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--alpha", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--alpha" in bad.stderr
    assert "--think-time" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--think-time", "nan"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--think-time" in bad.stderr


def test_phases_parse_and_reject_bad_specs(bench):
    assert bench.parse_phases("good-5g:6, poor:2,good-5g:1") == [("good-5g", 6), ("poor", 2), ("good-5g", 1)]
    for bad, msg in (("good-5g:3", "two phases"), ("lte:3,poor:2", "unknown link"),
                     ("good-5g,poor:2", "LINK:TURNS"), ("good-5g:0,poor:2", "LINK:TURNS")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_phases(bad)


def test_phase_summary_compares_each_phase_with_the_first(bench):
    def turn(phase, target, measured=0.5):
        return {"phase": phase, "link": phase.split(":")[1], "target": target, "measured_s": measured}

    records = (
        [turn("1:good-5g", "edge"), turn("1:good-5g", "edge"), turn("1:good-5g", "device")]
        # Degraded: the first hard turn still goes to the edge, the second moves.
        + [turn("2:poor", "edge", 1.5), turn("2:poor", "device"), turn("2:poor", "device")]
        # Recovered: back on the edge from the second turn.
        + [turn("3:good-5g", "device"), turn("3:good-5g", "edge"), turn("3:good-5g", "device")]
    )
    first, degraded, recovered = bench.phase_summary(records)
    assert first["same_as_first"] == 1.0 and first["hard_on_edge"] == first["hard_turns"] == 2
    assert first["edge_share"] == pytest.approx(2 / 3) and first["first_edge_turn"] == 1
    assert degraded["hard_on_edge"] == 1 and degraded["same_as_first"] == pytest.approx(2 / 3)
    assert degraded["mean_s"] == pytest.approx((1.5 + 0.5 + 0.5) / 3)
    assert recovered["hard_on_edge"] == 1 and recovered["first_edge_turn"] == 2
    never = bench.phase_summary(records[:3] + [turn("2:poor", "device")])[1]
    assert never["first_edge_turn"] is None and never["hard_on_edge"] == 0 and never["hard_turns"] == 1
    # Phases of unequal length compare the turns both have.
    longer = bench.phase_summary(records[:3] + [turn("2:poor", t) for t in ("edge", "edge", "device", "edge")])[1]
    assert longer["same_as_first"] == 1.0 and longer["turns"] == 4
