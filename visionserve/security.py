"""The API key check and the TLS context, shared by the HTTP and gRPC front doors.

No FastAPI or grpc here: each front door reads the presented credentials from its own headers or
metadata and asks `ApiKeyCheck` for a verdict. Both protocols accept the same two forms, so that
one client configuration works everywhere:

- `Authorization: Bearer <key>` (gRPC metadata `authorization`), what OAuth-style clients and
  Prometheus' `authorization` scrape setting send;
- `X-API-Key: <key>` (gRPC metadata `x-api-key`), what curl users and API gateways often use.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path

from visionserve.errors import ErrorCode, VisionError

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
BEARER = "bearer"

HOW_TO_SEND = "send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class ApiKeyCheck:
    """Checks presented credentials against the configured key.

    The comparison is `hmac.compare_digest` over SHA-256 digests of both: constant time, and the
    same length whatever was sent, so neither the key's bytes nor its length leak through timing.
    """

    def __init__(self, key: str):
        if not key:
            raise ValueError("an empty API key would let everyone in")
        self._digest = _digest(key)

    def matches(self, presented: str) -> bool:
        """True when `presented` is the key."""
        return hmac.compare_digest(_digest(presented), self._digest)

    def check(self, authorization: str | None, api_key: str | None) -> None:
        """Raise UNAUTHENTICATED unless the `Authorization` or `X-API-Key` value carries the key.

        The messages say what is wrong (missing, malformed, not the key), never what the key is.
        """
        presented = presented_key(authorization, api_key)
        if presented is None:
            raise VisionError(ErrorCode.UNAUTHENTICATED, f"this server needs an API key: {HOW_TO_SEND}")
        if not self.matches(presented):
            raise VisionError(ErrorCode.UNAUTHENTICATED, "the API key is not valid")


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request presents: `X-API-Key`'s value, else the token of `Authorization: Bearer`.

    An `Authorization` header of another scheme (e.g. Basic) presents no key; an empty bearer
    token presents the empty string, which never matches.
    """
    if api_key is not None:
        return api_key.strip()
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != BEARER:
        return None
    return token.strip()


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 at least) for the certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context
