"""Rows, dialogues and turns of each trace before and after decontamination, and per split.

The counts quoted in docs/simulation.md ("Data") and docs/router.md ("Split").

    python scripts/trace_counts.py --data-dir ../shared/data/routellm
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from device_runtime.sim.traces import BENCHMARKS, load_trace, split_of

    print(f"{'benchmark':<10}{'raw dlg':>9}{'raw turns':>10}{'dlg':>7}{'turns':>7}{'train':>7}{'val':>6}")
    for b in BENCHMARKS:
        raw = load_trace(b, args.data_dir, decontaminate=False)
        clean = load_trace(b, args.data_dir)
        turns = lambda ds: sum(len(d.turns) for d in ds)  # noqa: E731
        val = [d for d in clean if split_of(d.turns[0].prompt) == "val"]
        print(f"{b:<10}{len(raw):>9}{turns(raw):>10}{len(clean):>7}{turns(clean):>7}"
              f"{turns(clean) - turns(val):>7}{turns(val):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
