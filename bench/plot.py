"""Draw the benchmarks page's plot: lateness percentiles per system per workload, from a results file.

    python bench/plot.py [bench/results.json] [docs/_static/lateness.png]

The results file holds, per workload and system, the p50 / p90 / p99 / max lateness in seconds that
``bench/compare.py`` printed (and, where some did not run, how many: ``not_run``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERCENTILES = ("p50", "p90", "p99", "max")
COLOURS = {"celery_scheduller": "#2b6cb0", "Celery ETA": "#dd6b20", "django-celery-beat": "#718096"}


def draw(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    workloads = data["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 3.6), sharey=True)
    for ax, (workload, systems) in zip(axes, workloads.items(), strict=True):
        width = 0.8 / len(systems)
        for n, (system, figures) in enumerate(systems.items()):
            xs = [i + (n - (len(systems) - 1) / 2) * width for i in range(len(PERCENTILES))]
            ys = [max(figures[p], 0.0005) for p in PERCENTILES]  # log scale: 0.5 ms floor
            ax.bar(xs, ys, width, label=system, color=COLOURS.get(system))
        ax.set_yscale("log")
        ax.set_xticks(range(len(PERCENTILES)), PERCENTILES)
        ax.set_title(workload, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("lateness (s, log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(data.get("command", ""), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    draw(
        Path(args[0]) if args else ROOT / "bench" / "results.json",
        Path(args[1]) if len(args) > 1 else ROOT / "docs" / "_static" / "lateness.png",
    )
