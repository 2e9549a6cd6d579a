"""`python -m bench` end to end, short: real servers on port 0 (HTTP, gRPC, batching on
and off, overload, the seed 004 baseline), the real model, the report files and their counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.__main__ import main

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

REQUESTS = 8
LEVELS = (1, 2)
OVERLOAD_CONCURRENCY = 12
OVERLOAD_REQUESTS = 48


def test_a_short_run_writes_every_report_file_with_consistent_counts(
    real_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    status = main(
        [
            "--model-repository",
            str(real_repository),
            "--backends",
            "onnx",
            "--endpoints",
            "json,file,grpc",
            "--concurrency",
            ",".join(str(level) for level in LEVELS),
            "--batching",
            "on,off",
            "--baseline",
            "--overload",
            "--overload-concurrency",
            str(OVERLOAD_CONCURRENCY),
            "--overload-queue-size",
            "2",
            "--overload-requests",
            str(OVERLOAD_REQUESTS),
            "--requests",
            str(REQUESTS),
            "--warmup",
            "2",
            "--rounds",
            "2",
            "--layouts",
            "1x1,2x2",
            "--limit-cap",
            "5",
            "--progress",
            "lines",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert sorted(p.name for p in output.glob("*") if not p.name.endswith(".log")) == [
        "bench.csv",
        "bench.json",
        "bench.md",
        "throughput.png",
    ]
    assert (output / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert printed.out == (output / "bench.md").read_text()  # the table on stdout is the report
    assert "round 2/2" in printed.err and "bench: wrote" in printed.err

    data = json.loads((output / "bench.json").read_text())
    results = data["results"]
    with (output / "bench.csv").open(newline="") as file:
        records = list(csv.DictReader(file))
    assert len(records) == len(results)
    assert [r["endpoint"] for r in records] == [r["target"] for r in results]

    in_process = [r for r in results if r["scenario"] == "in-process"]
    sweep = [r for r in results if r["scenario"] == "sweep"]
    baseline = [r for r in results if r["scenario"] == "baseline"]
    overload = [r for r in results if r["scenario"] == "overload"]
    assert len(in_process) == 1
    # (json, file, grpc) x 2 levels x batching on/off; the baseline at each level; overload: json,
    # file and grpc for each batching mode
    assert len(sweep) == 3 * len(LEVELS) * 2 and len(baseline) == len(LEVELS) and len(overload) == 6
    assert sorted({(r["concurrency"], r["batching"]) for r in sweep}) == [
        (level, mode) for level in LEVELS for mode in ("off", "on")
    ]
    for row in sweep:
        assert (row["sent"], row["completed"], row["failed"]) == (REQUESTS, REQUESTS, 0), row["errors"]
        server = row["server"]
        assert server["batches"] >= 1 and server["mean_batch"] >= 1.0
        # every image of the row went through a batch; nothing was rejected
        assert sum(server["batch_size_counts"].values()) == server["batches"]
        assert server["rejected"] == {}
        assert row["ratio_to_in_process_limit"] > 0
        if row["batching"] == "off":
            assert server["mean_batch"] == 1.0 and list(server["batch_size_counts"]) == ["1"]
    for row in baseline:
        assert (row["completed"], row["failed"], row["batching"]) == (REQUESTS, 0, "none")
        assert row["server"] is None  # the baseline has no /metrics
        assert row["target"].startswith("POST /predict (JSON base64, seed 004")
    for row in overload:
        assert row["concurrency"] == OVERLOAD_CONCURRENCY and row["max_queue_size"] == 2
        rejected = sum(n for kind, n in row["errors"].items() if kind in ("HTTP 503", "gRPC UNAVAILABLE"))
        assert row["sent"] == OVERLOAD_REQUESTS == row["completed"] + rejected  # nothing lost
        assert row["server"]["rejected"].get("queue_full", 0) == rejected  # the server agrees
    assert all(entry["nothing_lost"] for entry in data["overload"])

    limit = data["in_process_limit"]["onnx"]
    assert limit["layout"] in ("1x1", "2x2") and limit["images_per_s"] > 0
    assert [entry["layout"] for entry in data["layouts"]] == ["1x1", "2x2"]
    assert all(entry["images"] == REQUESTS for entry in data["layouts"])
    assert len(data["images"]) >= 5 and all("600" in image and "JPEG" in image for image in data["images"])

    report = (output / "bench.md").read_text()
    assert "- in-process limit, onnx:" in report
    assert "nothing lost: every request sent was accepted or refused" in report
    assert "bucket estimates" in report
