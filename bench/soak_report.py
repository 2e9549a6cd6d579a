"""What a soak found (`soak`): each process's figures sampled from its /metrics, their growth
from after warm-up to the end against the allowed bounds, and the verdict, as markdown and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.server_metrics import scrape
from bench.stats import Measurement

if TYPE_CHECKING:
    from bench.soak import SoakConfig

FIGURES = {
    "rss_mb": "process_resident_memory_bytes",
    "threads": "process_threads",
    "open_fds": "process_open_fds",
    "tasks": "visionserve_event_loop_tasks",
}
"""A sample's fields -> the gauge each is read from (resident memory in MB, 1 MB = 2**20 bytes)."""


@dataclass(frozen=True)
class Sample:
    """One process's figures at `at_s` seconds after the soak started (negative: warm-up)."""

    at_s: float
    rss_mb: float
    threads: int
    open_fds: int
    tasks: int

    @classmethod
    def read(cls, metrics_url: str, at_s: float) -> Sample:
        """Scrape `metrics_url`; a figure the process does not report raises ValueError."""
        gauges = scrape(metrics_url).gauges
        missing = [name for name in FIGURES.values() if name not in gauges]
        if missing:
            raise ValueError(
                f"{metrics_url} reports no {', '.join(missing)} (a visionserve process on Linux?)"
            )
        return cls(
            at_s=round(at_s, 1),
            rss_mb=round(gauges[FIGURES["rss_mb"]] / 2**20, 1),
            threads=int(gauges[FIGURES["threads"]]),
            open_fds=int(gauges[FIGURES["open_fds"]]),
            tasks=int(gauges[FIGURES["tasks"]]),
        )


@dataclass(frozen=True)
class Check:
    """One figure of one process: after warm-up, at the end, its growth and the allowed growth."""

    figure: str
    warm: float
    end: float
    limit: float

    @property
    def growth(self) -> float:
        return self.end - self.warm

    @property
    def passed(self) -> bool:
        """RSS must grow by less than its bound; a count by no more than its slack."""
        return self.growth < self.limit if self.figure == "rss_mb" else self.growth <= self.limit


@dataclass
class ServerSoak:
    """One served process: what it is, its samples (warm-up first, end last) and the load it got."""

    protocol: str
    command: str
    endpoints: list[str]
    samples: list[Sample] = field(default_factory=list)
    measurement: Measurement = field(default_factory=lambda: Measurement(latencies_s=(), wall_s=0.0))

    def checks(self, limits: dict[str, float]) -> list[Check]:
        """Each figure after warm-up against the end."""
        warm, end = self.samples[0], self.samples[-1]
        return [Check(name, getattr(warm, name), getattr(end, name), limit) for name, limit in limits.items()]

    def peak_rss_mb(self) -> float:
        return max(sample.rss_mb for sample in self.samples)


@dataclass
class SoakReport:
    """A whole soak: its configuration, both processes and the verdict."""

    config: SoakConfig
    started: str
    servers: list[ServerSoak]

    @property
    def passed(self) -> bool:
        """Every request answered and every figure within its bound."""
        limits = self.config.limits()
        return all(
            server.measurement.failed == 0 and all(check.passed for check in server.checks(limits))
            for server in self.servers
        )

    def failures(self) -> list[str]:
        """What failed, one line each (empty when it passed)."""
        found = []
        for server in self.servers:
            if server.measurement.failed:
                m = server.measurement
                found.append(f"{server.protocol}: {m.failed} requests failed {dict(m.errors)}")
            for check in server.checks(self.config.limits()):
                if not check.passed:
                    bound = "<" if check.figure == "rss_mb" else "<="
                    found.append(
                        f"{server.protocol}: {check.figure} grew {check.warm:g} -> {check.end:g} "
                        f"(+{check.growth:g}; allowed {bound} {check.limit:g})"
                    )
        return found

    def to_dict(self) -> dict[str, object]:
        limits = self.config.limits()
        return {
            "started": self.started,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "passed": self.passed,
            "failures": self.failures(),
            "servers": [
                {
                    "protocol": server.protocol,
                    "command": server.command,
                    "endpoints": server.endpoints,
                    "requests": server.measurement.sent,
                    "answered": server.measurement.completed,
                    "failed": server.measurement.failed,
                    "errors": dict(server.measurement.errors),
                    "requests_per_s": round(server.measurement.throughput_rps, 1),
                    "peak_rss_mb": server.peak_rss_mb(),
                    "checks": [
                        {**asdict(check), "growth": round(check.growth, 1), "passed": check.passed}
                        for check in server.checks(limits)
                    ],
                    "samples": [asdict(sample) for sample in server.samples],
                }
                for server in self.servers
            ],
        }

    def to_markdown(self) -> str:
        config = self.config
        lines = [
            f"# Soak, {self.started}",
            "",
            f"{config.duration_s:g} s of steady load after a {config.warmup_s:g} s warm-up, "
            f"{config.concurrency} closed-loop senders per protocol, model {config.model_name} on "
            f"{config.backend}; figures from each process's /metrics, read with the load paused after "
            "warm-up and at the end.",
            "",
            "| process | requests | failed | req/s | figure | after warm-up | end | growth | allowed | |",
            "|---|--:|--:|--:|---|--:|--:|--:|--:|---|",
        ]
        for server in self.servers:
            m = server.measurement
            for i, check in enumerate(server.checks(config.limits())):
                head = (
                    f"{server.protocol} ({server.command}) | {m.sent} | {m.failed} | {m.throughput_rps:.1f}"
                    if i == 0
                    else " | | |"
                )
                allowed = f"< {check.limit:g}" if check.figure == "rss_mb" else f"<= {check.limit:g}"
                lines.append(
                    f"| {head} | {check.figure} | {check.warm:g} | {check.end:g} | {check.growth:+g} | "
                    f"{allowed} | {'ok' if check.passed else 'FAILED'} |"
                )
        lines += ["", "Samples (seconds into the soak: RSS MB / threads / fds / tasks):", ""]
        for server in self.servers:
            trend = ", ".join(
                f"{s.at_s:g}s: {s.rss_mb:g}/{s.threads}/{s.open_fds}/{s.tasks}" for s in server.samples
            )
            lines.append(f"- {server.protocol}: {trend} (peak RSS {server.peak_rss_mb():g} MB)")
        verdict = "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures())
        lines += ["", f"Result: {verdict}", ""]
        return "\n".join(lines)

    def write(self, output: Path) -> list[Path]:
        output.mkdir(parents=True, exist_ok=True)
        paths = [output / "soak.json", output / "soak.md"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths[1].write_text(self.to_markdown())
        return paths
