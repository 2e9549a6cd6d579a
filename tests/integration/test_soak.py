"""The soak (`make soak`, `python -m bench.soak`), short: both real servers under steady
load on every inference endpoint, their memory, threads, file descriptors and event-loop tasks
read from their own /metrics after warm-up and at the end. The verdict's logic is checked on
figures made up to fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import Sample, ServerSoak, SoakConfig, SoakReport, main, run_soak
from bench.stats import Measurement

# NOTE: ~25 s of load in all (both protocols at once): long enough for the lazily grown pools and
# the runtime's arena to settle in the warm-up, short enough for `make test`.
WARMUP_S = 10.0
DURATION_S = 15.0


@pytest.mark.real_model
@pytest.mark.slow
def test_a_short_soak_of_both_servers_shows_no_growth(real_repository: Path, tmp_path: Path) -> None:
    config = SoakConfig(
        model_repository=real_repository,
        duration_s=DURATION_S,
        warmup_s=WARMUP_S,
        interval_s=5.0,
        output=tmp_path,
    )
    report = run_soak(config, note=print)
    print(report.to_markdown())
    assert [s.protocol for s in report.servers] == ["HTTP", "gRPC"]
    for server in report.servers:
        m = server.measurement
        assert m.completed > 20 and m.failed == 0, (server.protocol, m.errors)
        assert len(server.samples) >= 3  # after warm-up, at least one during, the end
        assert (
            server.samples[0].rss_mb > 50 and server.samples[0].threads > 1 and server.samples[0].tasks >= 1
        )
    assert report.passed, report.failures()
    paths = report.write(tmp_path)
    data = json.loads(paths[0].read_text())
    assert data["passed"] is True and [s["requests"] for s in data["servers"]] == [
        s.measurement.sent for s in report.servers
    ]


def _server(*figures: tuple[float, int, int, int], failed: int = 0) -> ServerSoak:
    server = ServerSoak("HTTP", "python -m fastapi_onnx", ["POST /predict (JSON base64)"])
    server.samples = [Sample(float(i), *f) for i, f in enumerate(figures)]
    server.measurement = Measurement(
        latencies_s=(0.01,) * 100, wall_s=1.0, errors={"HTTP 500": failed} if failed else {}
    )
    return server


@pytest.mark.parametrize(
    ("end", "failed", "verdict"),
    [
        ((149.0, 8, 23, 4), 0, None),  # RSS +49 MB: under 50
        ((150.0, 8, 23, 4), 0, "rss_mb grew 100 -> 150"),
        ((120.0, 10, 23, 4), 0, "threads grew 8 -> 10"),  # 1 thread allowed
        ((120.0, 9, 24, 4), 0, "open_fds grew 23 -> 24"),
        ((120.0, 9, 23, 5), 0, "tasks grew 4 -> 5"),
        ((100.0, 8, 23, 4), 3, "3 requests failed"),
    ],
)
def test_the_verdict_fails_on_growth_over_the_bounds_and_on_failed_requests(
    end: tuple[float, int, int, int], failed: int, verdict: str | None, tmp_path: Path
) -> None:
    config = SoakConfig(max_rss_growth_mb=50, thread_slack=1, output=tmp_path)
    report = SoakReport(config, "now", [_server((100.0, 8, 23, 4), (180.0, 9, 23, 9), end, failed=failed)])
    if verdict is None:
        assert report.passed and report.failures() == []
        assert "Result: PASSED" in report.to_markdown()
    else:
        assert not report.passed
        (failure,) = report.failures()
        assert verdict in failure
        assert "FAILED" in report.to_markdown()


def test_the_command_line_refuses_bad_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--duration", "0"])
    assert "must be positive" in capsys.readouterr().err
