"""Sphinx configuration of the celery_scheduller documentation (``tox -e docs``: warnings are errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ.setdefault("CSCHED_DB", "sqlite")

import django  # noqa: E402

django.setup()

import celery_scheduller  # noqa: E402

project = "celery_scheduller"
author = "celery_scheduller contributors"
release = celery_scheduller.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "quickstart", "admin_screenshot.py", "generate.py", "deploy"]
html_theme = "furo"
html_static_path = ["_static"]
html_title = "celery_scheduller"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
suppress_warnings = ["myst.xref_missing"]


def _generate(app: object) -> None:
    """The pages drawn from the code, so they cannot drift: the settings, the state machine and the log
    actions, written into the pages themselves (``docs/generate.py``), and the pictures."""
    sys.path.insert(0, str(ROOT / "docs"))
    import generate

    generate.main(check=False)
    _state_diagram(ROOT / "docs" / "_static" / "states.png")
    from bench.plot import draw

    draw(ROOT / "bench" / "results.json", ROOT / "docs" / "_static" / "lateness.png")


def _state_diagram(out: Path) -> None:
    """The state machine as a picture, drawn from ``states.TRANSITIONS`` and ``states.TARGETS``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from celery_scheduller import states

    where = {
        states.PENDING: (0.0, 0.0),
        states.PUBLISHED: (5.0, 0.0),
        states.FINISHED: (10.0, 2.5),
        states.FAILED: (10.0, 0.0),
        states.CANCELLED: (10.0, -2.5),
        None: (14.0, 0.0),
    }
    fig, ax = plt.subplots(figsize=(12, 6))
    ax.set_aspect("equal")
    seen: dict[frozenset[object], int] = {}
    for name, starts in states.TRANSITIONS.items():
        end = states.TARGETS[name]
        for start in starts:
            (x0, y0), (x1, y1) = where[start], where[end]
            arrow = {"arrowstyle": "-|>", "shrinkA": 24, "shrinkB": 24, "color": "#4a5568", "lw": 1}
            if start == end:  # a loop above the node; a second one above the first
                k = seen.get(frozenset((start,)), 0)
                seen[frozenset((start,))] = k + 1
                lift = 0.3 + 1.2 * k
                ax.annotate(
                    "",
                    xy=(x0 + 0.5, y0 + lift),
                    xytext=(x0 - 0.5, y0 + lift),
                    arrowprops={**arrow, "shrinkA": 0, "shrinkB": 0, "connectionstyle": "arc3,rad=-1.6"},
                )
                lx, ly = x0, y0 + lift + 0.95
            else:
                pair = frozenset((start, end))
                n = seen.get(pair, 0)
                seen[pair] = n + 1
                rad = 0.12 + 0.14 * n
                ax.annotate(
                    "", xy=(x1, y1), xytext=(x0, y0), arrowprops={**arrow, "connectionstyle": f"arc3,rad={rad}"}
                )
                dx, dy = x1 - x0, y1 - y0
                lx, ly = (x0 + x1) / 2 + 0.5 * rad * dy, (y0 + y1) / 2 - 0.5 * rad * dx
            ax.text(
                lx,
                ly,
                name,
                ha="center",
                va="center",
                fontsize=8,
                color="#1a202c",
                bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.9},
            )
    for state, (x, y) in where.items():
        ax.text(
            x,
            y,
            state or "(removed)",
            ha="center",
            va="center",
            fontsize=10,
            weight="bold",
            bbox={"boxstyle": "round,pad=0.5", "fc": "#ebf4ff" if state else "#f7fafc", "ec": "#2b6cb0"},
        )
    ax.set_xlim(-1.5, 15.5)
    ax.set_ylim(-4.2, 4.2)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def setup(app: object) -> None:
    app.connect("builder-inited", _generate)  # type: ignore[attr-defined]
