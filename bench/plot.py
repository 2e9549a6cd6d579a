"""The report's plots:

- `throughput.png`: req/s and p99 against concurrency, one pair of axes per model, one line per
  (protocol/endpoint, backend, batching, alone), the model's in-process limit as a horizontal
  line; drawn when a run has two or more concurrency levels;
- `streams.png`: each stream row's per-frame latency as a distribution (the share of frames
  answered within x ms), one axes per model, in order (back to back and paced) against live;
  drawn when a run has stream rows.

matplotlib is imported here only, and only when there is something to plot: a run without it
installed still writes every other file. The figures are drawn without pyplot (no display
needed), so that writing a report from a notebook leaves the notebook's own plotting backend alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bench.report import BenchReport
    from bench.rows import ResultRow


def _title(report: BenchReport) -> str:
    machine = report.machine
    return (
        f"visionserve, {machine.get('cpu', '')}, {machine.get('usable_cores', '?')} cores, "
        f"{machine.get('date', '')}"
    )


def plotted_rows(report: BenchReport) -> dict[str, dict[str, list[ResultRow]]]:
    """Model -> line label -> its rows by ascending concurrency: served rows with model work,
    closed loop, not overload (the floors run no model; a stream has one level; overload is its
    own table)."""
    lines: dict[str, dict[str, list[ResultRow]]] = defaultdict(lambda: defaultdict(list))
    for row in report.rows:
        if row.scenario not in ("sweep", "baseline", "alone") or not row.model_work:
            continue
        batching = "" if row.batching in (None, "none") else f", batching {row.batching}"
        alone = ", served alone" if row.alone else ""
        lines[row.model][f"{row.mode} {row.target} ({row.runtime}{batching}{alone})"].append(row)
    return {
        model: {label: sorted(rows, key=lambda r: r.concurrency) for label, rows in found.items()}
        for model, found in lines.items()
    }


def plot_throughput(report: BenchReport, path: Path) -> bool:
    """Draw `throughput.png` into `path` if the run has two or more concurrency levels; return
    whether it was drawn."""
    models = plotted_rows(report)
    levels = sorted({row.concurrency for lines in models.values() for rows in lines.values() for row in rows})
    if len(levels) < 2:
        return False
    figure = _figure(14, 4.8 * len(models))
    axes_rows = figure.subplots(len(models), 2, squeeze=False)
    limits = report.limits()
    for (model, lines), (rate_axes, p99_axes) in zip(models.items(), axes_rows, strict=True):
        for label, rows in lines.items():
            x = [row.concurrency for row in rows]
            rate = [row.measurement.throughput_rps for row in rows]
            p99 = [s.p99_ms if (s := row.measurement.summary()) else float("nan") for row in rows]
            style = "--" if rows[0].scenario in ("baseline", "alone") else "-"
            rate_axes.plot(x, rate, style, marker="o", label=label)
            p99_axes.plot(x, p99, style, marker="o", label=label)
        for (runtime, limit_model), best in limits.items():
            if limit_model == model:
                rate_axes.axhline(
                    best.measurement.images_per_s,
                    color="grey",
                    linestyle=":",
                    label=f"in-process limit, {runtime} ({best.layout.label})",
                )
        name = model or "the model"
        for axes, title, unit in ((rate_axes, "throughput", "req/s"), (p99_axes, "p99 latency", "ms")):
            axes.set_xscale("log", base=2)
            axes.set_xticks(levels, [str(level) for level in levels])
            axes.set_xlabel("concurrent clients (closed loop)")
            axes.set_ylabel(unit)
            axes.set_title(f"{name}: {title}")
            axes.grid(True, alpha=0.3)
            axes.set_ylim(bottom=0)
        rate_axes.legend(fontsize="x-small", loc="best")
    figure.suptitle(_title(report), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def stream_rows(report: BenchReport) -> dict[str, list[ResultRow]]:
    """Model -> its stream rows with at least one frame answered, in the report's order."""
    found: dict[str, list[ResultRow]] = defaultdict(list)
    for row in report.rows:
        if row.scenario == "stream" and row.measurement.latencies_s:
            found[row.model].append(row)
    return dict(found)


def plot_streams(report: BenchReport, path: Path) -> bool:
    """Draw `streams.png` into `path` if the run has stream rows; return whether it was drawn."""
    models = stream_rows(report)
    if not models:
        return False
    from matplotlib.ticker import ScalarFormatter

    figure = _figure(7 * len(models), 6.0)
    axes_list = figure.subplots(1, len(models), squeeze=False)[0]
    for (model, rows), axes in zip(models.items(), axes_list, strict=True):
        for row in rows:
            values = sorted(v * 1e3 for v in row.measurement.latencies_s)
            share = [(i + 1) / len(values) for i in range(len(values))]
            m = row.measurement
            label = f"{row.target}: {m.throughput_rps:.1f} frames/s computed" + (
                f", {m.skipped} skipped" if m.skipped else ""
            )
            axes.step(values, share, where="post", label=label)
        axes.set_xscale("log")
        for axis in (axes.xaxis,):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
        axes.tick_params(axis="x", which="minor", labelsize="x-small")
        axes.set_xlabel("frame latency (ms, log scale)")
        axes.set_ylabel("share of frames computed")
        axes.set_title(f"{model or 'the model'}: per-frame latency, one stream")
        axes.set_ylim(0, 1.02)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.16))
    figure.suptitle(_title(report), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))
