"""Rendering shared by every report: headless figures, markdown tables, mean ± std, paths a page may show.

Every table and figure of the run report, the sweep comparison and the results page goes through
here, so they look alike and matplotlib is set up (Agg, no display) in one place.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend: reports run on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, tight: bool = True, dpi: int = DPI) -> Path:
    """Write `fig` to `path` and free it; returns the path."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def figure_link(alt: str, path: Path, folder: str = "") -> str:
    """Markdown image of a figure, linked by name (or `folder/name`) relative to the page beside it."""
    return f"![{alt}]({folder + '/' if folder else ''}{path.name})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """A markdown table; `align` holds one letter per column, `r` right-aligns it (default: left)."""
    rule = "".join("---:|" if align[i : i + 1] == "r" else "---|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + rule]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def mean_pm_std(values: Sequence[float], fmt: str) -> str:
    """`mean ± sample std` of the values, the value alone when there is one, `n/a` when none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def display_path(path: Path, cwd: Path | None = None) -> str:
    """A path as a committed page may show it: relative to the current directory when inside it, else
    just its name. Never absolute, so a page reads the same on every machine."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to((cwd or Path.cwd()).resolve()))
    except ValueError:
        return absolute.name
