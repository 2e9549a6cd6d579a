"""Serve the UI with waitress: `python -m flask_ui`.

waitress is a production WSGI server in pure Python: a fixed pool of threads (a streaming video
holds one), request bodies read in full before the app sees them (so a too-large upload gets the
friendly 413 page rather than a reset connection), and no C extensions to build in the image.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from waitress.server import create_server

from flask_ui.app import create_app
from flask_ui.settings import UISettings
from visionserve.errors import ConfigurationError
from visionserve.settings import from_env
from visionserve.signals import ignore_stop_signals

logger = logging.getLogger(__name__)

# NOTE: waitress answers bodies over its own limit with a bare-text 413 before the app runs; it is
# set well above the app's limit so that real-world oversize uploads get the app's page, while a
# gigabyte-sized one is still cut off without being spooled to disk.
WAITRESS_BODY_FACTOR = 4
# NOTE: slow and idle clients. waitress closes a connection with no request in progress after
# `channel_timeout` s without a byte (its default 120 s; 30 s is the APIs' order of magnitude: their
# header timeout is 10 s, body 60 s), and stops accepting beyond `connection_limit` open connections
# (its default, stated), so they cannot take every file descriptor. It has no deadline for a whole
# request: a client trickling a byte every few seconds holds its connection until it stops.
WAITRESS_CHANNEL_TIMEOUT_S = 30
WAITRESS_CONNECTION_LIMIT = 100


def _banner(url: str, settings: UISettings) -> str:
    return (
        f"\nvisionserve UI on {url}\n"
        f"  HTTP API:  {settings.api_url}\n"
        f"  gRPC API:  {settings.grpc_target}\n"
        "  stop:      Ctrl-C\n"
    )


class _Stop:
    """The SIGTERM/SIGINT handler: the first signal ends waitress's loop (it shuts its threads
    down on KeyboardInterrupt); later ones are ignored while that happens.

    NOTE: `make run`'s Ctrl-C reaches every process of the group, then the stack SIGTERMs every
    child still running: a second KeyboardInterrupt raised during the shutdown would escape and
    end the process by SIGINT instead of with exit code 0.
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            return
        self.requested = True
        raise KeyboardInterrupt


def main() -> int:
    """Serve until SIGTERM / Ctrl-C; exit code 0, or 2 when the settings or the port are wrong."""
    try:
        settings = from_env(UISettings)
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if settings.log_level != "debug":
        # NOTE: httpx2 logs every request to the API at INFO; the UI's own log says what matters.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    app = create_app(settings)
    try:
        server = create_server(
            app,
            host=settings.host,
            port=settings.port,
            threads=settings.threads,
            ident="visionserve-ui",
            max_request_body_size=settings.max_content_length * WAITRESS_BODY_FACTOR + 1024 * 1024,
            clear_untrusted_proxy_headers=True,
            channel_timeout=WAITRESS_CHANNEL_TIMEOUT_S,
            connection_limit=WAITRESS_CONNECTION_LIMIT,
        )
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 2
    # NOTE: SIGINT too, explicitly: a process started in the background by a non-interactive
    # shell inherits SIGINT ignored, and `make run`'s Ctrl-C must still stop it (the APIs do the
    # same). Installed before the banner, which tells whoever waits for it that signals work.
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        print(_banner(f"http://{shown}:{server.effective_port}", settings), flush=True)
        server.run()  # returns after KeyboardInterrupt (Ctrl-C or SIGTERM), threads shut down
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        app.extensions["visionserve_ui"]["api"].close()
    logger.info("stopped")
    ignore_stop_signals()
    return 0
