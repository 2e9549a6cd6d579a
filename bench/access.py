"""How the harness reaches a secured deployment: the API key it sends and the certificates it trusts.

`--api-key` (default: `VISION_API_KEY`) goes on every request: `Authorization: Bearer <key>` on
HTTP (the load, `GET /models`, the `/metrics` scrapes) and metadata `authorization: Bearer <key>`
on gRPC. `--tls-ca` trusts a PEM bundle for `https://` URLs and turns on TLS for
`--grpc-target`; without it, `https://` URLs are checked against the system CAs and gRPC is plain.
The key is never part of a report, a message or this object's repr.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

KEY_HINT = "give the deployment's key with --api-key or the VISION_API_KEY variable"


@dataclass(frozen=True)
class Access:
    """The credentials of one deployment; `Access()` is an open one (no key, no private CA)."""

    api_key: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    """PEM certificates to trust: for `https://` URLs, and TLS on for gRPC; None: system CAs for
    `https://`, plain gRPC."""

    def headers(self) -> dict[str, str]:
        """The HTTP headers that carry the key (none without one)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata that carries the key (none without one)."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context for `https://`: `tls_ca`, else the system CAs."""
        return ssl.create_default_context(cafile=None if self.tls_ca is None else str(self.tls_ca))

    def grpc_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for gRPC trusting `tls_ca`; None (plain gRPC) without it."""
        if self.tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca.read_bytes())

    def described(self) -> str:
        """What the report says about it (never the key)."""
        key = "no API key"
        if self.api_key:
            key = "API key sent (Authorization: Bearer; its value is not recorded)"
        tls = f"TLS trusting {self.tls_ca}" if self.tls_ca is not None else "no private CA"
        return f"{key}; {tls}"


OPEN = Access()
"""No key and no private CA: a deployment with security off (and the harness's own servers)."""
