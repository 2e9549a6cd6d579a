"""`python -m grpc_server.client` against a real grpc.aio server over FakeRuntime (port 0)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from grpc_server.client import frames, main
from grpc_server.server import GrpcServer
from tests.conftest import encode
from tests.fixtures import (
    FakeDetectorRuntime,
    FakeRuntime,
    grpc_server_of,
    write_fake_detector,
    write_fake_entry,
)
from visionserve.settings import GrpcSettings, ServerSettings


@pytest.fixture
def target(tmp_path: Path) -> Iterator[str]:
    """A ready GrpcServer over FakeRuntime (the default) and the fake detector (`fakedet`) on its
    own event loop in a thread; yields host:port."""
    runtime = FakeRuntime(write_fake_entry(tmp_path / "repo"))
    detector = FakeDetectorRuntime(write_fake_detector(tmp_path / "repo"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-server", daemon=True)
    thread.start()

    async def start() -> tuple[GrpcServer, int]:
        server = grpc_server_of(
            GrpcSettings(port=0, metrics_port=0), ServerSettings(), runtime, detector
        )  # on its loop
        port = await server.start()
        assert server.loaded is not None
        await server.loaded
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _image(tmp_path: Path, name: str, color: str = "teal") -> Path:
    path = tmp_path / name
    path.write_bytes(encode(Image.new("RGB", (48, 40), color)))
    return path


def _gif(path: Path, count: int = 5) -> Path:
    images = [Image.new("RGB", (40, 30), (50 * i, 100, 200 - 30 * i)) for i in range(count)]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=40, loop=0)
    return path


def test_one_predict_per_image(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _image(tmp_path, "a.png"), _image(tmp_path, "b.png", "orange")
    assert main([str(first), str(second), "--topk", "3", "--target", target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["a.png", "b.png"]
    for line in lines:
        assert "class_9:" in line and line.count(":") == 3  # top 3 label:prob, the top class first
        assert line.endswith(" ms)") and "(server " in line


def test_the_target_comes_from_the_environment(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VISION_GRPC_TARGET", target)
    assert main([str(_image(tmp_path, "a.png"))]) == 0
    assert capsys.readouterr().out.startswith("a.png  class_9:")


def test_batch_answers_every_slot_and_fails_on_a_bad_image(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    good = _image(tmp_path, "good.png")
    assert main([str(good), str(bad), str(good), "--batch", "--target", target]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("good.png  class_9:") and lines[2].startswith("good.png  class_9:")
    assert lines[1].startswith("bad.png  error ")
    assert main([str(good), "--batch", "--target", target]) == 0


def test_stream_of_an_animated_gif_answers_every_frame_in_order(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gif = _gif(tmp_path / "clip.gif")
    assert main([str(gif), "--stream", "--target", target]) == 0
    *answers, summary = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in answers] == [["frame", str(i)] for i in range(5)]
    assert all("class_9:" in line and "(server " in line for line in answers)
    assert summary.startswith("5 frames (0 failed, 0 skipped) in ") and summary.endswith(" frames/s computed")


def test_stream_every_second_frame(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gif = _gif(tmp_path / "clip.gif")
    assert main([str(gif), "--stream", "--every", "2", "--target", target]) == 0
    *answers, summary = capsys.readouterr().out.splitlines()
    assert [int(line.split()[1]) for line in answers] == [0, 2, 4]  # frame ids are the frames' indices
    assert summary.startswith("3 frames (0 failed, 0 skipped)")


def test_stream_of_a_folder_and_files_with_a_bad_frame(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("002.png", "001.png", "003.jpg"):
        (folder / name).write_bytes(
            encode(Image.new("RGB", (32, 32), "red"), "JPEG" if "jpg" in name else "PNG")
        )
    (folder / "notes.txt").write_text("not a frame")  # skipped: not an image file name
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert len(list(frames([folder]))) == 3
    assert main([str(folder), str(bad), "--stream", "--target", target]) == 1
    *answers, summary = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in answers] == ["0", "1", "2", "3"]
    assert " error " in answers[3] and "class_9:" in answers[0]
    assert summary.startswith("4 frames (1 failed, 0 skipped)")


def test_a_server_that_is_down_prints_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        for mode in ([], ["--batch"], ["--stream"]):
            image = str(_image(tmp_path, "a.png"))
            assert main([image, *mode, "--target", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
            captured = capsys.readouterr()
            assert captured.err.startswith("error: UNAVAILABLE: ")
            assert "Traceback" not in captured.err and captured.out == ""


def test_a_server_error_prints_its_code_and_details(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    assert main([str(bad), "--target", target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: ") and "Traceback" not in err


def test_a_missing_input_is_named_before_any_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.png"), "--target", "127.0.0.1:1"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_detector_answers_its_objects(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    red = _image(tmp_path, "red.png", "red")
    assert main([str(red), "--model", "fakedet", "--target", target]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("red.png  cat:") and "[12,8,36,32]" in line, line
    assert main([str(red), "--model", "fakedet", "--score-threshold", "0.99", "--target", target]) == 0
    assert "no objects" in capsys.readouterr().out
    assert main([str(red), "--model", "fakedet", "--topk", "2", "--target", target]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_live_answers_every_frame_skipped_or_computed(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [Image.new("RGB", (40, 30), (20 * i, 100, 200 - 15 * i)) for i in range(12)]
    gif = tmp_path / "clip.gif"
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=40, loop=0)
    assert main([str(gif), "--live", "--model", "fakedet", "--target", target]) == 0
    *answers, summary = capsys.readouterr().out.splitlines()
    assert [int(line.split()[1]) for line in answers] == list(range(12))
    assert all("skipped" in line or "no objects" in line or "[" in line for line in answers)
    assert summary.startswith("12 frames (0 failed, ") and "frames/s computed" in summary
