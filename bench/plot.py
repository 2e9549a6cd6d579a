"""`throughput.png`: req/s and p99 against concurrency, one line per (protocol/endpoint, backend,
batching), with the in-process limit as a horizontal line; drawn when a run has two or more
concurrency levels.

matplotlib is imported here only, and only when there is something to plot: a run without it
installed still writes every other file. The figure is drawn without pyplot (no display needed),
so that writing a report from a notebook leaves the notebook's own plotting backend alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.report import BenchReport
    from bench.rows import ResultRow


def plotted_rows(report: BenchReport) -> dict[str, list[ResultRow]]:
    """Line label -> its rows by ascending concurrency: served rows with model work, closed loop,
    not overload (the floors run no model; the stream has one level; overload is its own table)."""
    lines: dict[str, list[ResultRow]] = defaultdict(list)
    for row in report.rows:
        if row.scenario not in ("sweep", "baseline") or not row.model_work:
            continue
        batching = "" if row.batching in (None, "none") else f", batching {row.batching}"
        lines[f"{row.mode} {row.target} ({row.runtime}{batching})"].append(row)
    return {label: sorted(rows, key=lambda r: r.concurrency) for label, rows in lines.items()}


def plot_throughput(report: BenchReport, path: Path) -> bool:
    """Draw the plot into `path` (PNG) if the run has two or more concurrency levels; return
    whether it was drawn."""
    lines = plotted_rows(report)
    levels = sorted({row.concurrency for rows in lines.values() for row in rows})
    if len(levels) < 2:
        return False
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 5.5))
    rate_axes, p99_axes = figure.subplots(1, 2)
    for label, rows in lines.items():
        x = [row.concurrency for row in rows]
        rate = [row.measurement.throughput_rps for row in rows]
        p99 = [s.p99_ms if (s := row.measurement.summary()) else float("nan") for row in rows]
        style = "--" if rows[0].scenario == "baseline" else "-"
        rate_axes.plot(x, rate, style, marker="o", label=label)
        p99_axes.plot(x, p99, style, marker="o", label=label)
    for runtime, best in report.limits().items():
        rate_axes.axhline(
            best.measurement.images_per_s,
            color="grey",
            linestyle=":",
            label=f"in-process limit, {runtime} ({best.layout.label})",
        )
    for axes, title, unit in ((rate_axes, "throughput", "req/s"), (p99_axes, "p99 latency", "ms")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.set_xlabel("concurrent clients (closed loop)")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
    rate_axes.set_ylim(bottom=0)
    p99_axes.set_ylim(bottom=0)
    rate_axes.legend(fontsize="x-small", loc="best")
    machine = report.machine
    figure.suptitle(
        f"visionserve, {machine.get('cpu', '')}, {machine.get('usable_cores', '?')} cores, "
        f"{machine.get('date', '')}",
        fontsize="small",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True
