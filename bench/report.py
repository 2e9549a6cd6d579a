"""The benchmark's output: a markdown report (stdout, docs/benchmarks.md), a JSON document and a
CSV (notebooks), and a plot of throughput and p99 against concurrency. Latencies are
milliseconds everywhere, and every column says so.

The rows and the report live here; the markdown tables in `tables`, the CSV in `csvfile`, the
plot in `plot`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import csvfile, faces_report, plot, tables, targets
from bench.face_stage import StageCost
from bench.rows import (
    BASELINE,
    GRPC,
    GRPC_STREAM,
    HTTP,
    IN_PROCESS,
    REJECTIONS,
    LayoutRow,
    ResultRow,
)
from bench.stats import LatencySummary, summarize

__all__ = [
    "BASELINE",
    "GRPC",
    "GRPC_STREAM",
    "HTTP",
    "IN_PROCESS",
    "ONNX_GRPC_TARGET_MS",
    "ONNX_TARGET_MS",
    "REJECTIONS",
    "BenchReport",
    "LayoutRow",
    "Overhead",
    "ResultRow",
]

FORMAT = "visionserve-bench/3"
ONNX_TARGET_MS = 2.0
"""The goal: served HTTP p50 at concurrency 1 within this of the in-process p50, on ONNX Runtime."""
ONNX_GRPC_TARGET_MS = 1.0
"""The goal: gRPC unary p50 at concurrency 1 within this of the in-process p50, on ONNX Runtime."""

ONNX_TARGETS_MS = {HTTP: ONNX_TARGET_MS, GRPC: ONNX_GRPC_TARGET_MS}
"""Served mode -> the ONNX goal; these modes are the ones compared with in-process."""


@dataclass(frozen=True)
class Overhead:
    """What serving adds: served p50 minus in-process p50, for the same runtime and image."""

    runtime: str
    target: str
    served_p50_ms: float
    in_process_p50_ms: float
    difference_ms: float
    target_ms: float | None
    """The goal for this row (ONNX, the classifier only), or None."""
    mode: str = HTTP
    """How it was served: `HTTP` or `gRPC`."""
    model: str = ""

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
    layouts: list[LayoutRow] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    """The images sent, described (name, size, format, bytes)."""
    notes: list[str] = field(default_factory=list)
    """What the run left out or ignored, and why (e.g. `in-process limit: not measured (no local
    model repository)`), one sentence each."""
    tasks: dict[str, str] = field(default_factory=dict)
    """Model -> its task (`classification`, `detection`), where known: which targets apply."""
    stream_fps: float | None = None
    """The paced streams' frame rate (a camera's), where the run has them."""
    face_stages: list[StageCost] = field(default_factory=list)
    """A pipeline's classifier stage on its one-face and group images (`face_stage`)."""

    def limits(self) -> dict[tuple[str, str], LayoutRow]:
        """(runtime, model) -> its best layout: the in-process limit served rows are held against."""
        best: dict[tuple[str, str], LayoutRow] = {}
        for row in self.layouts:
            key = (row.runtime, row.model)
            current = best.get(key)
            if current is None or row.measurement.images_per_s > current.measurement.images_per_s:
                best[key] = row
        return best

    def limit_ratio(self, row: ResultRow) -> float | None:
        """A served row's req/s (a stream's frames computed per second) as a fraction of its
        runtime's and model's in-process limit (model work only)."""
        limit = self.limits().get((row.runtime, row.model))
        if limit is None or not row.model_work or row.mode == IN_PROCESS or row.image:
            return None
        rate = limit.measurement.images_per_s
        return row.measurement.throughput_rps / rate if rate > 0 else None

    def models(self) -> list[str]:
        """The models of the rows, in order of appearance."""
        return list(dict.fromkeys([*(row.model for row in self.rows), *(row.model for row in self.layouts)]))

    def classifier(self) -> str | None:
        """The model the earlier issues' classifier targets hold to: the first classifier of the
        run; with no tasks known, the first model; None when no model is a classifier."""
        models = self.models()
        if not self.tasks:
            return models[0] if models else ""
        return next((model for model in models if self.tasks.get(model) == "classification"), None)

    def models_of(self, task: str) -> list[str]:
        """The run's models of `task`, in order."""
        return [model for model in self.models() if self.tasks.get(model) == task]

    def overload_rows(self) -> list[ResultRow]:
        """The overload rows."""
        return [row for row in self.rows if row.overload_queue_size is not None]

    def nothing_lost(self) -> bool:
        """True when every overload row's requests were all answered: accepted or refused."""
        return all(row.lost == 0 for row in self.overload_rows())

    def overheads(self) -> list[Overhead]:
        """Served vs in-process p50 for each served row (HTTP, gRPC unary) with model work at
        concurrency 1."""
        baselines: dict[tuple[str, str], float] = {}
        for row in self.rows:
            summary = row.measurement.summary()
            if row.mode == IN_PROCESS and row.concurrency == 1 and summary is not None and not row.image:
                baselines.setdefault((row.runtime, row.model), summary.p50_ms)
        found = []
        for row in self.rows:
            summary = row.measurement.summary()
            if (
                row.mode not in ONNX_TARGETS_MS
                or not row.model_work
                or row.concurrency != 1
                or row.overload_queue_size is not None
                or row.alone
                or row.image
                or summary is None
            ):
                continue
            if (row.runtime, row.model) not in baselines:
                continue
            base = baselines[(row.runtime, row.model)]
            goal = row.runtime == "onnx" and row.model == self.classifier()
            found.append(
                Overhead(
                    runtime=row.runtime,
                    target=row.target if row.batching is None else f"{row.target}, batching {row.batching}",
                    served_p50_ms=summary.p50_ms,
                    in_process_p50_ms=base,
                    difference_ms=summary.p50_ms - base,
                    target_ms=ONNX_TARGETS_MS[row.mode] if goal else None,
                    mode=row.mode,
                    model=row.model,
                )
            )
        return found

    def to_records(self) -> list[csvfile.Record]:
        """The result rows as plain records with the CSV's columns (`csvfile.COLUMNS`), numbers as
        numbers and None for empty cells: `pandas.DataFrame(report.to_records())` in a notebook."""
        return csvfile.records(self)

    def latency_records(self) -> list[csvfile.Record]:
        """Every measured request's latency (ms, successes only, warm-up excluded) with its row's
        key columns: a latency histogram's data (`csvfile.latency_records`)."""
        return csvfile.latency_records(self)

    def batch_size_records(self) -> list[csvfile.Record]:
        """The batch sizes the servers' /metrics counted during each served row, by bucket: the
        batch-size histogram's data (`csvfile.batch_size_records`)."""
        return csvfile.batch_size_records(self)

    def to_markdown(self) -> str:
        """The report as markdown: header facts, images, the results table, server figures, the
        in-process limit, overload, stages, serving overhead."""
        return tables.markdown(self)

    def to_dict(self) -> dict[str, object]:
        """The report as plain data for JSON: summaries and every latency, in milliseconds."""
        limits = self.limits()
        return {
            "format": FORMAT,
            "units": {
                "latency": "ms",
                "throughput": "completed requests per second",
                "wall": "s",
                "in_process_limit": "images per second",
                "queue_time": "ms, estimated from the histogram buckets of /metrics",
            },
            "machine": self.machine,
            "settings": self.settings,
            "models": {model: self.tasks.get(model) for model in self.models()},
            "images": list(self.images),
            "notes": list(self.notes),
            "results": [self._row_dict(row) for row in self.rows],
            "in_process_limit": [
                {"runtime": runtime, "model": model, "layout": best.layout.label, **_layout_dict(best)}
                for (runtime, model), best in limits.items()
            ],
            "layouts": [
                {"runtime": row.runtime, "model": row.model, "layout": row.layout.label, **_layout_dict(row)}
                for row in self.layouts
            ],
            "overload": [
                {
                    "runtime": row.runtime,
                    "model": row.model,
                    "mode": row.mode,
                    "target": row.target,
                    "batching": row.batching,
                    "concurrency": row.concurrency,
                    "max_queue_size": row.overload_queue_size,
                    "sent": row.measurement.sent,
                    "accepted": row.measurement.completed,
                    "rejected": row.rejected,
                    "lost": row.lost,
                    "nothing_lost": row.lost == 0,
                    "accepted_latency_ms": _summary_dict(row.measurement.summary()),
                    "rejection_latency_ms": _summary_dict(row.measurement.failures_summary(REJECTIONS)),
                }
                for row in self.overload_rows()
            ],
            "faces": faces_report.faces_dict(self),
            "targets": [asdict(check) for check in targets.check_targets(self)],
            "overhead": [
                {
                    **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(o).items()},
                    "met": o.met,
                }
                for o in self.overheads()
            ],
        }

    def _row_dict(self, row: ResultRow) -> dict[str, object]:
        m = row.measurement
        ratio = self.limit_ratio(row)
        return {
            "runtime": row.runtime,
            "model": row.model,
            "mode": row.mode,
            "target": row.target,
            "image": row.image or None,
            "scenario": row.scenario,
            "batching": row.batching,
            "concurrency": row.concurrency,
            "model_work": row.model_work,
            "max_queue_size": row.overload_queue_size,
            "sent": m.sent,
            "completed": m.completed,
            "failed": m.failed,
            "skipped": m.skipped,
            "errors": dict(m.errors),
            "wall_s": round(m.wall_s, 4),
            "throughput_rps": round(m.throughput_rps, 2),
            "ratio_to_in_process_limit": None if ratio is None else round(ratio, 4),
            "latency_ms": _summary_dict(m.summary()),
            "failure_latency_ms": {
                kind: _summary_dict(summarize(values))
                for kind, values in m.error_latencies_s.items()
                if values
            },
            "server": None if row.server is None else row.server.to_dict(),
            "stages_ms": {
                name: _summary_dict(summarize(values) if values else None)
                for name, values in row.stages_s.items()
            },
            "latencies_ms": [round(v * 1e3, 4) for v in m.latencies_s],
        }

    def to_json(self) -> str:
        """`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def write(self, output_dir: Path) -> list[Path]:
        """Write `bench.json`, `bench.md`, `bench.csv`, with two or more concurrency levels
        `throughput.png`, and with stream rows `streams.png` into `output_dir` (created if
        missing); return the paths written."""
        output_dir.mkdir(parents=True, exist_ok=True)
        json_path = output_dir / "bench.json"
        markdown_path = output_dir / "bench.md"
        csv_path = output_dir / "bench.csv"
        json_path.write_text(self.to_json())
        markdown_path.write_text(self.to_markdown())
        csvfile.write_csv(self, csv_path)
        written = [json_path, markdown_path, csv_path]
        plot_path = output_dir / "throughput.png"
        if plot.plot_throughput(self, plot_path):
            written.append(plot_path)
        streams_path = output_dir / "streams.png"
        if plot.plot_streams(self, streams_path):
            written.append(streams_path)
        return written


def _summary_dict(summary: LatencySummary | None) -> dict[str, float | int] | None:
    if summary is None:
        return None
    return {
        key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(summary).items()
    }


def _layout_dict(row: LayoutRow) -> dict[str, object]:
    m = row.measurement
    return {
        "workers": row.layout.workers,
        "intra_op_threads": row.layout.threads,
        "images": m.images,
        "wall_s": round(m.wall_s, 4),
        "images_per_s": round(m.images_per_s, 2),
        "batches": m.batches,
        "mean_batch": None if m.mean_batch is None else round(m.mean_batch, 3),
        "max_batch_size": row.max_batch_size,
    }
