"""What `python -m bench.processes` found: per layout (two processes, one process), each protocol's
requests per second and latency under load on both at once, their latency alone at concurrency 1,
and each process's memory and CPU, as markdown and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.stats import LatencySummary, Measurement

PROTOCOLS = ("HTTP", "gRPC")


@dataclass
class ProcessFigures:
    """One served process of a layout: what it is, its resident memory (MB: after warm-up, the
    peak sampled under load, at the end) and the CPU seconds it used under the mixed load."""

    command: str
    pid: int
    rss_warm_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    cpu_s: float = 0.0
    """User + system CPU seconds of the process (all its threads) during the mixed rounds."""
    threads: int = 0


@dataclass
class LayoutResult:
    """One layout's measurements, rounds merged."""

    name: str
    description: str
    processes: list[ProcessFigures]
    mixed: dict[str, Measurement] = field(default_factory=dict)
    """Protocol -> the mixed load's measurement of its senders."""
    single: dict[str, Measurement] = field(default_factory=dict)
    """Protocol -> one sender alone (concurrency 1)."""
    mean_batch: float | None = None
    """Images per predict_batch call of the loaded model during the mixed rounds (all processes)."""

    @property
    def total_rps(self) -> float:
        """Both protocols' completed requests per second, together (the rounds' wall time is
        shared: each protocol's wall time is the round's)."""
        return sum(m.throughput_rps for m in self.mixed.values())

    @property
    def rss_peak_mb(self) -> float:
        """The layout's resident memory at its peak: its processes' peaks added up."""
        return sum(p.rss_peak_mb for p in self.processes)

    @property
    def cpu_ms_per_request(self) -> float | None:
        """Server CPU per answered request under the mixed load (ms), all processes together."""
        answered = sum(m.completed for m in self.mixed.values())
        return 1e3 * sum(p.cpu_s for p in self.processes) / answered if answered else None


def _summary(measurement: Measurement | None) -> LatencySummary | None:
    return None if measurement is None else measurement.summary()


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass
class ProcessesReport:
    """Both layouts, the load they took, and where it ran."""

    machine: dict[str, str]
    settings: dict[str, object]
    layouts: list[LayoutResult]

    def to_markdown(self) -> str:
        """The tables: mixed load, concurrency 1, processes."""
        lines = [
            "## visionserve: one process or two for HTTP and gRPC",
            "",
            f"- date: {self.machine.get('date', '?')}; machine: {self.machine.get('cpu', '?')}, "
            f"{self.machine.get('usable_cores', '?')} usable cores",
            *[f"- {key.replace('_', ' ')}: {value}" for key, value in self.settings.items()],
            "",
            "Both protocols loaded at once (closed loop; req/s = completed / wall time of the rounds):",
            "",
            "| layout | HTTP req/s | HTTP p50 ms | HTTP p99 ms | gRPC req/s | gRPC p50 ms | gRPC p99 ms "
            "| total req/s | failed | mean batch | server CPU ms/request | RSS MB (peak, all processes) |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for layout in self.layouts:
            cells = [layout.description]
            for protocol in PROTOCOLS:
                m = layout.mixed.get(protocol)
                s = _summary(m)
                cells += [
                    _cell(m.throughput_rps if m else None),
                    _cell(s.p50_ms if s else None, 2),
                    _cell(s.p99_ms if s else None, 2),
                ]
            failed = sum(m.failed for m in layout.mixed.values())
            cells += [
                _cell(layout.total_rps),
                str(failed),
                _cell(layout.mean_batch, 2),
                _cell(layout.cpu_ms_per_request, 2),
                _cell(layout.rss_peak_mb),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "One client alone (concurrency 1), each protocol in turn:",
            "",
            "| layout | HTTP p50 ms | HTTP p99 ms | HTTP req/s | gRPC p50 ms | gRPC p99 ms | gRPC req/s |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for layout in self.layouts:
            cells = [layout.description]
            for protocol in PROTOCOLS:
                m = layout.single.get(protocol)
                s = _summary(m)
                cells += [
                    _cell(s.p50_ms if s else None, 2),
                    _cell(s.p99_ms if s else None, 2),
                    _cell(m.throughput_rps if m else None),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Processes (resident memory in MB after warm-up, peak under load, at the end; CPU seconds "
            "under the mixed load; OS threads at the end):",
            "",
            "| layout | process | RSS warm | RSS peak | RSS end | CPU s | threads |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for layout in self.layouts:
            for process in layout.processes:
                lines.append(
                    f"| {layout.name} | `{process.command}` | {process.rss_warm_mb:.1f} | "
                    f"{process.rss_peak_mb:.1f} | {process.rss_end_mb:.1f} | {process.cpu_s:.1f} | "
                    f"{process.threads} |"
                )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON (latencies in ms)."""

        def measured(m: Measurement) -> dict[str, object]:
            s = m.summary()
            return {
                "completed": m.completed,
                "failed": m.failed,
                "errors": dict(m.errors),
                "wall_s": round(m.wall_s, 3),
                "requests_per_s": round(m.throughput_rps, 2),
                "latency_ms": None if s is None else {k: round(v, 3) for k, v in asdict(s).items()},
            }

        return {
            "machine": self.machine,
            "settings": self.settings,
            "layouts": [
                {
                    "name": layout.name,
                    "description": layout.description,
                    "total_requests_per_s": round(layout.total_rps, 2),
                    "mean_batch": layout.mean_batch,
                    "server_cpu_ms_per_request": layout.cpu_ms_per_request,
                    "rss_peak_mb": round(layout.rss_peak_mb, 1),
                    "mixed": {protocol: measured(m) for protocol, m in layout.mixed.items()},
                    "concurrency_1": {protocol: measured(m) for protocol, m in layout.single.items()},
                    "processes": [asdict(process) for process in layout.processes],
                }
                for layout in self.layouts
            ],
        }

    def write(self, output: Path) -> list[Path]:
        """`processes.json` and `processes.md` into `output`."""
        output.mkdir(parents=True, exist_ok=True)
        paths = [output / "processes.json", output / "processes.md"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        paths[1].write_text(self.to_markdown())
        return paths
