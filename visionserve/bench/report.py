"""The benchmark's output: a markdown table (stdout, docs/benchmarks.md) and a JSON document
(notebooks). Latencies are milliseconds everywhere, and every column says so."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from visionserve.bench.stats import LatencySummary, Measurement, summarize

FORMAT = "visionserve-bench/1"
ONNX_TARGET_MS = 2.0
"""The goal: served HTTP p50 at concurrency 1 within this of the in-process p50, on ONNX Runtime."""
ONNX_GRPC_TARGET_MS = 1.0
"""The goal: gRPC unary p50 at concurrency 1 within this of the in-process p50, on ONNX Runtime."""

IN_PROCESS = "in-process"
HTTP = "HTTP"
GRPC = "gRPC"
"""Unary gRPC calls (Predict)."""
GRPC_STREAM = "gRPC stream"
"""Frames of one PredictStream call: req/s is frames/s; not compared with in-process."""

ONNX_TARGETS_MS = {HTTP: ONNX_TARGET_MS, GRPC: ONNX_GRPC_TARGET_MS}
"""Served mode -> the ONNX goal; these modes are the ones compared with in-process."""


@dataclass(frozen=True)
class ResultRow:
    """One measured row: which runtime, how it was reached, and what was measured."""

    runtime: str
    """`onnx`, `torch compiled` or `torch eager`: the runtime and its settings."""
    mode: str
    """`in-process`, `HTTP`, `gRPC` (unary) or `gRPC stream`."""
    target: str
    """What was measured, e.g. the pipeline's stages or `POST /predict/file (multipart)`."""
    concurrency: int
    measurement: Measurement
    stages_s: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """In-process rows: each stage's latencies (seconds) of the same passes."""
    model_work: bool = True
    """False for the HTTP floor (a request that runs no model)."""


@dataclass(frozen=True)
class Overhead:
    """What serving adds: served p50 minus in-process p50, for the same runtime and image."""

    runtime: str
    target: str
    served_p50_ms: float
    in_process_p50_ms: float
    difference_ms: float
    target_ms: float | None
    """The goal for this row (ONNX only), or None."""
    mode: str = HTTP
    """How it was served: `HTTP` or `gRPC`."""

    @property
    def met(self) -> bool | None:
        """Whether the goal is met; None where there is no goal."""
        return None if self.target_ms is None else self.difference_ms <= self.target_ms


@dataclass
class BenchReport:
    """A whole run: where it ran, with which settings, and its rows."""

    machine: dict[str, str]
    settings: dict[str, object]
    rows: list[ResultRow] = field(default_factory=list)

    def overheads(self) -> list[Overhead]:
        """Served vs in-process p50 for each served row (HTTP, gRPC unary) with model work at
        concurrency 1."""
        baselines: dict[str, float] = {}
        for row in self.rows:
            summary = row.measurement.summary()
            if row.mode == IN_PROCESS and summary is not None:
                baselines.setdefault(row.runtime, summary.p50_ms)
        found = []
        for row in self.rows:
            summary = row.measurement.summary()
            if (
                row.mode not in ONNX_TARGETS_MS
                or not row.model_work
                or row.concurrency != 1
                or summary is None
            ):
                continue
            if row.runtime not in baselines:
                continue
            base = baselines[row.runtime]
            found.append(
                Overhead(
                    runtime=row.runtime,
                    target=row.target,
                    served_p50_ms=summary.p50_ms,
                    in_process_p50_ms=base,
                    difference_ms=summary.p50_ms - base,
                    target_ms=ONNX_TARGETS_MS[row.mode] if row.runtime == "onnx" else None,
                    mode=row.mode,
                )
            )
        return found

    def to_markdown(self) -> str:
        """The report as markdown: header facts, the results table, stages, serving overhead."""
        lines = ["## visionserve benchmark: in-process pipeline vs served HTTP and gRPC", ""]
        lines += _header_lines(self.machine, self.settings)
        lines += ["", *_results_table(self.rows)]
        if any(row.mode == GRPC_STREAM for row in self.rows):
            lines += [
                "",
                f"{GRPC_STREAM} rows: req/s is frames/s of one PredictStream call, frames sent back to back; "
                "a frame's latency runs from its write to its answer, so it includes waiting behind the "
                "frames ahead of it.",
            ]
        failures = _failure_lines(self.rows)
        if failures:
            lines += ["", "Failed requests (not in the latencies):", *failures]
        stages = _stages_table(self.rows)
        if stages:
            lines += ["", "In-process stages, p50 ms (batch 1, one image after another):", "", *stages]
        overheads = self.overheads()
        if overheads:
            lines += [
                "",
                "What serving adds at concurrency 1 (served p50 − in-process p50 of the same runtime):",
                "",
                *_overhead_table(overheads),
            ]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, object]:
        """The report as plain data for JSON: summaries and every latency, in milliseconds."""
        return {
            "format": FORMAT,
            "units": {"latency": "ms", "throughput": "completed requests per second", "wall": "s"},
            "machine": self.machine,
            "settings": self.settings,
            "results": [_row_dict(row) for row in self.rows],
            "overhead": [
                {
                    **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(o).items()},
                    "met": o.met,
                }
                for o in self.overheads()
            ],
        }

    def to_json(self) -> str:
        """`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def write(self, output_dir: Path) -> list[Path]:
        """Write `bench.json` and `bench.md` into `output_dir` (created if missing)."""
        output_dir.mkdir(parents=True, exist_ok=True)
        json_path = output_dir / "bench.json"
        markdown_path = output_dir / "bench.md"
        json_path.write_text(self.to_json())
        markdown_path.write_text(self.to_markdown())
        return [json_path, markdown_path]


def _header_lines(machine: Mapping[str, str], settings: Mapping[str, object]) -> list[str]:
    lines = [f"- date: {machine.get('date', 'unknown')}"]
    cores = f"{machine.get('usable_cores', '?')} usable cores of {machine.get('logical_cpus', '?')}"
    lines.append(f"- machine: {machine.get('cpu', 'unknown CPU')}, {cores}, {machine.get('os', '')}".rstrip())
    if "gpu" in machine:
        lines.append(f"- GPU: {machine['gpu']}")
    skip = {"date", "cpu", "usable_cores", "logical_cpus", "os", "gpu"}
    versions = ", ".join(f"{name} {version}" for name, version in machine.items() if name not in skip)
    lines.append(f"- versions: {versions}")
    lines += [f"- {key.replace('_', ' ')}: {_setting(value)}" for key, value in settings.items()]
    return lines


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _results_table(rows: list[ResultRow]) -> list[str]:
    lines = [
        "| runtime | mode | measured | conc. | ok | failed | p50 ms | p95 ms | p99 ms | mean ms | req/s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        m = row.measurement
        s = m.summary()
        latency = (
            [_ms(s.p50_ms), _ms(s.p95_ms), _ms(s.p99_ms), _ms(s.mean_ms)] if s is not None else ["–"] * 4
        )
        cells = [row.runtime, row.mode, row.target, str(row.concurrency), str(m.completed), str(m.failed)]
        cells += [*latency, f"{m.throughput_rps:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _failure_lines(rows: list[ResultRow]) -> list[str]:
    lines = []
    for row in rows:
        if row.measurement.errors:
            kinds = ", ".join(f"{kind} ×{count}" for kind, count in sorted(row.measurement.errors.items()))
            lines.append(f"- {row.runtime} {row.target}: {kinds}")
    return lines


def _stages_table(rows: list[ResultRow]) -> list[str]:
    staged = [row for row in rows if row.stages_s and row.measurement.latencies_s]
    if not staged:
        return []
    names = list(staged[0].stages_s)
    lines = [
        "| runtime | " + " | ".join(names) + " | total |",
        "|---|" + "--:|" * (len(names) + 1),
    ]
    for row in staged:
        cells = [
            _ms(summarize(row.stages_s[name]).p50_ms) if row.stages_s.get(name) else "–" for name in names
        ]
        total = summarize(row.measurement.latencies_s).p50_ms
        lines.append(f"| {row.runtime} | " + " | ".join(cells) + f" | {_ms(total)} |")
    return lines


def _overhead_table(overheads: list[Overhead]) -> list[str]:
    lines = [
        "| runtime | served | served p50 ms | in-process p50 ms | difference ms | goal |",
        "|---|---|--:|--:|--:|---|",
    ]
    for o in overheads:
        goal = "–" if o.target_ms is None else f"≤ {o.target_ms:g} ms: {'met' if o.met else 'missed'}"
        cells = [o.runtime, o.target, _ms(o.served_p50_ms), _ms(o.in_process_p50_ms)]
        lines.append("| " + " | ".join([*cells, f"{o.difference_ms:+.2f}", goal]) + " |")
    return lines


def _summary_dict(summary: LatencySummary | None) -> dict[str, float | int] | None:
    if summary is None:
        return None
    return {
        key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(summary).items()
    }


def _row_dict(row: ResultRow) -> dict[str, object]:
    m = row.measurement
    return {
        "runtime": row.runtime,
        "mode": row.mode,
        "target": row.target,
        "concurrency": row.concurrency,
        "model_work": row.model_work,
        "sent": m.sent,
        "completed": m.completed,
        "failed": m.failed,
        "errors": dict(m.errors),
        "wall_s": round(m.wall_s, 4),
        "throughput_rps": round(m.throughput_rps, 2),
        "latency_ms": _summary_dict(m.summary()),
        "stages_ms": {
            name: _summary_dict(summarize(values) if values else None)
            for name, values in row.stages_s.items()
        },
        "latencies_ms": [round(v * 1e3, 4) for v in m.latencies_s],
    }
