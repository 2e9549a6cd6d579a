"""`python -m flask_ui` as users start it: bad settings stop it with a message naming the variable;
SIGTERM and Ctrl-C stop it with exit code 0. (The pages themselves: test_ui_browser.py.)"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx2
import pytest

from tests.conftest import ROOT
from tests.processes import ServiceProcess

UI_BANNER = re.compile(r"visionserve UI on (http://127\.0\.0\.1:\d+)")


@pytest.mark.parametrize(
    ("variable", "value"), [("VISION_UI_PORT", "http"), ("VISION_UI_API_URL", "localhost:8000")]
)
def test_a_bad_setting_stops_it_naming_the_variable(variable: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flask_ui"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", variable: value},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert variable in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serves_on_a_free_port_and_stops_cleanly(sig: int) -> None:
    ui = ServiceProcess(
        "flask_ui", {"VISION_UI_PORT": "0", "VISION_UI_API_URL": "http://127.0.0.1:9"}, UI_BANNER
    )
    try:
        assert httpx2.get(f"{ui.address}/health/live", timeout=5).json() == {"status": "live"}
        page = httpx2.get(ui.address, timeout=10)
        assert page.status_code == 200 and "API unreachable" in page.text, "the page works with the API down"
        assert ui.stop(sig) == 0
    finally:
        output = ui.output()
    assert "Traceback" not in output, output


def test_ctrl_c_then_the_stack_s_sigterm_still_exits_zero() -> None:
    """What `make run` does on Ctrl-C: the group gets SIGINT, then the stack SIGTERMs every child
    still running, while the UI is already shutting down."""
    ui = ServiceProcess(
        "flask_ui", {"VISION_UI_PORT": "0", "VISION_UI_API_URL": "http://127.0.0.1:9"}, UI_BANNER
    )
    try:
        ui.process.send_signal(signal.SIGINT)
        ui.process.send_signal(signal.SIGTERM)
        assert ui.process.wait(timeout=30) == 0
    finally:
        output = ui.output()
    assert "Traceback" not in output, output
