"""A service started as users start it (`python -m MODULE`), read until its banner, stopped by signal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """`python -m module` with `env`; stdout (with stderr) is read until `banner` matches, and
    `address` is the banner's first group."""

    def __init__(self, module: str, env: dict[str, str], banner: re.Pattern[str], prefix: Sequence[str] = ()):
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", module],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.address = ""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = banner.search(line)
            if match:
                self.address = match.group(1)
                break
        assert self.address, "no banner:\n" + "".join(self.lines)

    def stop(self, sig: int, timeout_s: float = 30) -> int:
        """Send `sig`; return the exit code."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)

    def output(self) -> str:
        """Everything the process printed (kills it first if it still runs)."""
        if self.process.poll() is None:
            self.process.kill()
        assert self.process.stdout is not None
        if not self.process.stdout.closed:
            self.lines.append(self.process.stdout.read())
            self.process.stdout.close()
        self.process.wait()
        return "".join(self.lines)
