"""`python -m bench` end to end, short: real servers on port 0 (HTTP, gRPC, batching on
and off, overload, the seed 004 baseline; the classifier and the detector in one run, with the
streams and the classifier served alone), the real models, the report files and their counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.processes import main as processes_main

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
            "--model",
            "efficientnet_lite0",
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

    (limit,) = data["in_process_limit"]
    assert (limit["runtime"], limit["model"]) == ("onnx", "efficientnet_lite0")
    assert limit["layout"] in ("1x1", "2x2") and limit["images_per_s"] > 0
    assert [entry["layout"] for entry in data["layouts"]] == ["1x1", "2x2"]
    assert all(entry["images"] == REQUESTS for entry in data["layouts"])
    assert len(data["images"]) >= 5 and all("600" in image and "JPEG" in image for image in data["images"])

    report = (output / "bench.md").read_text()
    assert "- in-process limit, onnx, efficientnet_lite0:" in report
    assert "nothing lost: every request sent was accepted or refused" in report
    assert "bucket estimates" in report


STREAM_FRAMES = 6


def test_a_run_of_the_classifier_and_the_detector_measures_both_and_their_streams(
    real_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    status = main(
        [
            "--model-repository",
            str(real_repository),
            "--model",
            "efficientnet_lite0,yolo11n",
            "--endpoints",
            "json,grpc,stream,pacedstream,livestream",
            "--concurrency",
            "1,2",
            "--requests",
            str(STREAM_FRAMES),
            "--warmup",
            "2",
            "--rounds",
            "2",
            "--layouts",
            "2x2",
            "--clip-fps",
            "60",
            "--progress",
            "lines",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    written = sorted(p.name for p in output.glob("*") if p.suffix != ".log")
    assert written == ["bench.csv", "bench.json", "bench.md", "streams.png", "throughput.png"]
    data = json.loads((output / "bench.json").read_text())
    assert data["models"] == {"efficientnet_lite0": "classification", "yolo11n": "detection"}
    results = data["results"]
    by_model = {model: [r for r in results if r["model"] == model] for model in data["models"]}
    for model, rows in by_model.items():
        sweep = [r for r in rows if r["scenario"] == "sweep"]
        assert len(sweep) == 2 * 2 and all(r["failed"] == 0 for r in sweep), (model, sweep)
        for row in sweep:  # each row's server figures count its own model's batches only
            assert sum(row["server"]["batch_size_counts"].values()) == row["server"]["batches"] >= 1
            assert row["completed"] == STREAM_FRAMES and row["ratio_to_in_process_limit"] > 0
        streams = [r for r in rows if r["scenario"] == "stream"]
        assert [r["target"] for r in streams] == [
            "Inference/PredictStream (1 stream)",
            "Inference/PredictStream (1 stream, 60 frames/s)",
            "Inference/PredictLive (1 stream, 60 frames/s)",
        ]
        for row in streams:
            assert row["sent"] == STREAM_FRAMES == row["completed"] + row["skipped"] and row["failed"] == 0
        (limit,) = [entry for entry in data["in_process_limit"] if entry["model"] == model]
        assert limit["images_per_s"] > 0
    alone = [r for r in results if r["scenario"] == "alone"]
    assert {(r["model"], r["mode"], r["concurrency"]) for r in alone} == {
        ("efficientnet_lite0", mode, level) for mode in ("HTTP", "gRPC") for level in (1, 2)
    }
    detections = [r for r in results if r["model"] == "yolo11n" and r["scenario"] == "in-process"]
    assert len(detections) == 1 and set(detections[0]["stages_ms"]) == {
        "decode",
        "preprocess",
        "predict_batch",
        "postprocess",
    }
    report = (output / "bench.md").read_text()
    assert "| stream frames/s (in order) | yolo11n, batching on |" in report
    assert "efficientnet_lite0 with 1 more model(s) loaded vs alone" not in report  # c=16 only
    assert "clip (yolo11n): 84 frames 640x480 JPEG" in report
    with (output / "bench.csv").open(newline="") as file:
        assert {record["model"] for record in csv.DictReader(file)} == {"efficientnet_lite0", "yolo11n"}


def test_one_process_and_two_are_measured_with_both_protocols_at_once(
    real_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "processes"
    status = processes_main(
        [
            "--model-repository",
            str(real_repository),
            "--models",
            "efficientnet_lite0",
            "--http-clients",
            "2",
            "--grpc-clients",
            "2",
            "--duration",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0.5",
            "--single-requests",
            "4",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    data = json.loads((output / "processes.json").read_text())
    two, one = data["layouts"]
    assert (two["name"], len(two["processes"]), one["name"], len(one["processes"])) == ("two", 2, "one", 1)
    for layout in (two, one):
        for protocol in ("HTTP", "gRPC"):
            mixed, alone = layout["mixed"][protocol], layout["concurrency_1"][protocol]
            assert mixed["completed"] > 0 and mixed["failed"] == 0, (layout["name"], protocol, mixed)
            assert (alone["completed"], alone["failed"]) == (4, 0)
        assert all(process["rss_peak_mb"] > 50 and process["cpu_s"] > 0 for process in layout["processes"])
    assert printed.out == (output / "processes.md").read_text()
    assert "one process (VISION_GRPC_SERVE_HTTP=true python -m grpc_server)" in printed.out


FACE_REQUESTS = 6


def test_a_run_of_the_face_pipeline_measures_its_limit_faces_per_second_and_classifier_stage(
    real_repository: Path,
    real_faces: tuple[object, object, object],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "out"
    status = main(
        [
            "--model-repository",
            str(real_repository),
            "--model",
            "face_expression",
            "--endpoints",
            "json,grpc,livestream",
            "--concurrency",
            "1,16",
            "--requests",
            str(FACE_REQUESTS),
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--clip-fps",
            "60",
            "--progress",
            "lines",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    data = json.loads((output / "bench.json").read_text())
    assert data["models"] == {"face_expression": "face_expression"}
    results = data["results"]
    assert all(r["failed"] == 0 for r in results), [r for r in results if r["failed"]]
    sweep = [r for r in results if r["scenario"] == "sweep"]
    assert {(r["mode"], r["concurrency"]) for r in sweep} == {
        (m, c) for m in ("HTTP", "gRPC") for c in (1, 16)
    }
    for row in sweep:  # the servers' figures of a pipeline's row are its detector's batches
        assert row["completed"] == FACE_REQUESTS and row["ratio_to_in_process_limit"] > 0
        assert sum(row["server"]["batch_size_counts"].values()) == row["server"]["batches"] >= 1
    in_process = [r for r in results if r["scenario"] == "in-process"]
    assert [r["concurrency"] for r in in_process] == [1, 16]
    group = [r for r in results if r["scenario"] == "image"]
    assert {(r["mode"], r["concurrency"], r["image"]) for r in group} == {
        (mode, level, "group-8-faces.jpg") for mode, level in (("in-process", 1), ("in-process", 16))
    } | {(mode, 16, "group-8-faces.jpg") for mode in ("HTTP", "gRPC")}
    (live,) = [r for r in results if r["scenario"] == "stream"]
    assert live["target"] == "Inference/PredictLive (1 stream, 60 frames/s)"
    assert live["completed"] + live["skipped"] == FACE_REQUESTS and live["latency_ms"]["p99_ms"] > 0

    assert [entry["layout"] for entry in data["layouts"]] == ["c=1", "c=4", "c=16", "c=32"]
    (limit,) = data["in_process_limit"]
    assert limit["model"] == "face_expression" and limit["images_per_s"] > 0
    faces = data["faces"]
    stages = {stage["image"]: stage for stage in faces["classifier_stage"]}
    assert (stages["astronaut.jpg"]["faces"], stages["group-8-faces.jpg"]["faces"]) == (1, 8)
    assert stages["group-8-faces.jpg"]["classifier_mean_batch"] == 8.0  # its faces in one batch
    for stage in stages.values():
        assert stage["pairs"] == FACE_REQUESTS and stage["per_face_ms_direct"] > 0
    rates = faces["faces_per_s"]
    assert len(rates) == 4 and all(
        r["faces_per_s"] == pytest.approx(8 * r["images_per_s"], abs=0.1) for r in rates
    )

    report = (output / "bench.md").read_text()
    assert "Faces per second on one image of many faces" in report
    assert "Classifier stage of face_expression (crop + classify)" in report
    for target in ("c=16 HTTP JSON throughput", "c=16 gRPC unary throughput"):
        assert f"| {target} | face_expression, batching on |" in report
    assert "| classifier stage per face, 8 faces vs 1 | face_expression, in-process" in report
    assert "group-8-faces.jpg (800x480 JPEG" in report
