"""What every entrypoint does with SIGTERM/SIGINT once it has stopped (no heavy imports: the UI
uses it too)."""

from __future__ import annotations

import signal


def ignore_stop_signals() -> None:
    """Ignore SIGTERM/SIGINT from here on; call it when everything is stopped and the process is
    about to exit.

    NOTE: Python puts the default handlers back while the interpreter finalises; a SIGTERM that
    arrives then (`make run`'s, right after Ctrl-C) would end the process by signal instead of
    with its exit code. Ignoring earlier, from a handler, races with a signal already caught but
    not yet handled (Python reports "Signal 15 ignored due to race condition").
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
