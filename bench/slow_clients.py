"""Hold N slow HTTP connections against a running server and watch them close.

A third send nothing, a third trickle header lines (one a second), a third promise a 100 kB body
and trickle it a byte a second. Every 2 s it prints how many are still open; meanwhile it sends
normal requests one at a time (`GET /health/live`, and `POST /predict/file` with PHOTO if given)
and reports their statuses and latency. docs/reliability.md quotes its figures.

    python -m bench.slow_clients PORT [N] [DURATION_S] [PHOTO]
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_HEADS = (
    b"",
    b"POST /predict/file HTTP/1.1\r\nHost: x\r\n",
    b"POST /predict/file HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 100000\r\n\r\n--b\r\n",
)
"""What each kind of slow connection sends first: nothing, a partial head, a whole head."""


@dataclass
class Flood:
    """The slow connections' state, shared by their tasks (one event loop)."""

    port: int
    started: float = field(default_factory=time.monotonic)
    open_now: int = 0
    answered_408: int = 0
    closed_at: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def hold(self, index: int) -> None:
        """One slow connection, until the server closes it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.open_now += 1
        kind = index % 3
        writer.write(_HEADS[kind])

        async def trickle() -> None:
            try:
                while kind:
                    await asyncio.sleep(1.0)
                    writer.write(b"X-Slow: 1\r\n" if kind == 1 else b"X")
                    await writer.drain()
            except (ConnectionError, RuntimeError):
                pass

        task = asyncio.create_task(trickle())
        data = b""
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionError:
            pass
        task.cancel()
        writer.close()
        self.open_now -= 1
        self.answered_408 += data.startswith(b"HTTP/1.1 408")
        self.closed_at.append(self.elapsed())


def upload(photo: bytes) -> bytes:
    """A whole `POST /predict/file` request carrying `photo`."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--b--\r\n"
    )
    head = (
        b"POST /predict/file HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


async def normal(port: int, request: bytes) -> tuple[int, float]:
    """One request on a new connection: its status and milliseconds."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.close()
    return int(head.split()[1]), (time.monotonic() - started) * 1e3


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def run(port: int, count: int, duration_s: float, photo: bytes | None) -> None:
    """Open `count` slow connections, then send normal requests for `duration_s`; print as it goes."""
    flood = Flood(port)
    holders = []
    for index in range(count):
        holders.append(asyncio.create_task(flood.hold(index)))
        if index % 100 == 99:
            await asyncio.sleep(0.01)
    print(f"{count} slow connections opened in {flood.elapsed():.1f} s")
    requests = {"health": b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"}
    if photo:
        requests["predict"] = upload(photo)
    latency: dict[str, list[float]] = {name: [] for name in requests}
    statuses: dict[int, int] = {}
    first_ok: float | None = None
    next_report = 0.0
    while flood.elapsed() < duration_s:
        for name, request in requests.items():
            status, ms = await normal(port, request)
            statuses[status] = statuses.get(status, 0) + 1
            latency[name].append(ms)
            if status == 200 and first_ok is None:
                first_ok = flood.elapsed()
        if flood.elapsed() >= next_report:
            print(f"t={flood.elapsed():5.1f} s  open={flood.open_now}")
            next_report += 2.0
        await asyncio.sleep(0.1)
    for name, values in latency.items():
        if values:
            print(
                f"{name}: {len(values)} requests, p50 {_percentile(values, 0.5):.1f} ms, "
                f"p99 {_percentile(values, 0.99):.1f} ms, max {max(values):.1f} ms"
            )
    print(f"statuses of the normal requests: {statuses}; first 200 at {first_ok} s")
    print(
        f"still open at the end: {flood.open_now}; answered 408: {flood.answered_408}; closed between "
        f"{min(flood.closed_at, default=0):.1f} and {max(flood.closed_at, default=0):.1f} s"
    )
    for holder in holders:
        holder.cancel()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    port = int(argv[0])
    count = int(argv[1]) if len(argv) > 1 else 3000
    duration_s = float(argv[2]) if len(argv) > 2 else 30.0
    photo = Path(argv[3]).read_bytes() if len(argv) > 3 else None
    asyncio.run(run(port, count, duration_s, photo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
