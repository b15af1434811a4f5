"""PNG plots of a simulation summary, in the style of the paper's Figs. 3-6.

- quality vs mean latency (Figs. 3, 4, 6)
- quality vs edge share, i.e. LLM usage (Fig. 5)

One line per router; the random baseline is dashed, the others solid.  For
MT-Bench the "w/o context" policy (``NAME/no-context``) gets its own colour,
as Fig. 6 does.  matplotlib is imported inside the functions (Agg backend), so
importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path

_COLORS = {
    "oracle": "tab:green",
    "bert": "tab:blue",
    "random": "tab:gray",
    "oracle/no-context": "tab:olive",
    "bert/no-context": "tab:orange",
    "random/no-context": "tab:red",
}
_EXTRA = ["tab:purple", "tab:brown", "tab:pink", "tab:cyan"]


def _label(name: str) -> str:
    base, _, variant = name.partition("/")
    pretty = {"bert": "BERT", "random": "Random", "oracle": "Oracle"}.get(base, base)
    if variant == "no-context":
        return f"{pretty} w/o context"
    return pretty


def _quality_label(benchmark: str) -> str:
    return "Average score (1-10)" if benchmark == "mt-bench" else "Accuracy"


def _title(summary: dict, what: str) -> str:
    p = summary.get("params", {})
    gs = p.get("gamma_s", {}).get("decode_s_per_token", "?")
    ge = p.get("gamma_e", {}).get("decode_s_per_token", "?")
    link = p.get("link", {})
    return (
        f"{summary['benchmark']}: {what}  (n={summary['n']}, α={p.get('alpha', '?')}, "
        f"γs={gs}, γe={ge}, B={link.get('bandwidth_tokens_per_s', '?'):.0e}, "
        f"δ={link.get('overhead_s', '?')}, upload={p.get('upload_mode', '?')})"
    )


def plot_summary(summary: dict, out_dir: str | Path, *, dpi: int = 110) -> list[Path]:
    """Write ``<benchmark>_quality_vs_latency.png`` and ``<benchmark>_quality_vs_edge_share.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bench = summary["benchmark"]
    written = []
    extra = iter(_EXTRA * 4)
    colors = {name: _COLORS.get(name) or next(extra) for name in summary["routers"]}
    axes_spec = [
        ("mean_latency_s", "Mean latency per query (s)", "quality_vs_latency", "quality vs latency"),
        ("edge_share", "Edge LLM usage (share of queries)", "quality_vs_edge_share", "quality vs edge share"),
    ]
    for x_key, x_label, stem, what in axes_spec:
        fig, ax = plt.subplots(figsize=(8, 5.2))
        for name, r in summary["routers"].items():
            # Parametric in θ (curve order is by edge share), so a non-monotone
            # latency curve is drawn as swept rather than zig-zagging.
            curve = r["curve"]
            ax.plot(
                [c[x_key] for c in curve],
                [c["quality"] for c in curve],
                linestyle="--" if name.split("/")[0] == "random" else "-",
                marker=".",
                markersize=4,
                color=colors[name],
                label=f"{_label(name)} (APGR {r['apgr']:.2f})",
            )
        for key, marker, text in (("all_device", "s", "all device SLM"), ("all_edge", "^", "all edge LLM")):
            base = summary[key]
            x = base["mean_latency_s"] if x_key == "mean_latency_s" else (0.0 if key == "all_device" else 1.0)
            ax.plot([x], [base["quality"]], marker=marker, color="black", linestyle="none",
                    markersize=8, label=f"{text} ({base['quality']:.3f})")
        ax.set_xlabel(x_label)
        ax.set_ylabel(_quality_label(bench))
        ax.set_title(_title(summary, what), fontsize=8.5)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / f"{bench}_{stem}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written
