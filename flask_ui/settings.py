"""The UI's settings, read from the environment (prefix `VISION_UI_`) by the entrypoint.

The UI is its own deployable: it finds the inference APIs through these settings only (in a
container they are other hosts), never through hard-coded addresses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class UISettings(BaseSettings):
    """Where the UI listens, which APIs it calls, and what it accepts from a browser."""

    model_config = SettingsConfigDict(env_prefix="VISION_UI_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface to bind (`0.0.0.0` in a container)."""

    port: int = Field(default=5000, ge=0, le=65535)
    """HTTP port of the UI; 0 picks a free one (tests)."""

    api_url: str = "http://127.0.0.1:8000"
    """Base URL of the HTTP inference API, as this process reaches it (e.g. `http://fastapi:8000`
    inside Docker Compose)."""

    api_public_url: str | None = None
    """Base URL of the HTTP API as a browser reaches it, for the link to its docs on the status
    page. Default: `api_url`."""

    grpc_target: str = "127.0.0.1:50051"
    """host:port of the gRPC inference API (the video page streams frames to it)."""

    max_content_length: int = Field(default=16 * MiB, ge=1024)
    """Largest upload accepted (bytes; Flask's MAX_CONTENT_LENGTH). Larger uploads get a 413 page
    that names this setting."""

    request_timeout_s: float = Field(default=30.0, gt=0)
    """How long the image page waits for the HTTP API's answer."""

    status_timeout_s: float = Field(default=2.0, gt=0)
    """How long health and model look-ups wait (status page, page headers)."""

    max_video_frames: int = Field(default=300, ge=1, le=100_000)
    """Most frames of one video sent to the model (after sampling); the rest are skipped and the
    page says so. Bounds how long one upload can keep the services busy."""

    video_timeout_s: float = Field(default=120.0, gt=0)
    """Deadline of one video's gRPC stream, decoding included."""

    api_key: SecretStr | None = None
    """The inference APIs' key (their VISION_API_KEY), sent with every call to them as
    `Authorization: Bearer <key>`. Never shown on a page. Empty: none."""

    grpc_tls: bool = False
    """Reach the gRPC API over TLS (its VISION_TLS_CERT_FILE is set). HTTPS for the HTTP API is
    chosen by `api_url`'s scheme."""

    tls_ca_file: Path | None = None
    """PEM certificate(s) trusted for the APIs' TLS (e.g. a private CA or a self-signed
    certificate). Default: the system's trusted authorities."""

    grpc_max_message_bytes: int = Field(default=32 * MiB, ge=MiB)
    """Largest gRPC message sent or received (the gRPC server's VISION_GRPC_MAX_MESSAGE_BYTES)."""

    threads: int = Field(default=8, ge=1, le=256)
    """Requests served at the same time. A video holds one thread while it streams."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the UI's loggers."""

    @field_validator("api_url", "api_public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"must be an http:// or https:// URL such as http://127.0.0.1:8000, got {value!r}"
            )
        return value.rstrip("/")

    @field_validator("grpc_target")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or "://" in value:
            raise ValueError(f"must be host:port such as 127.0.0.1:50051 (no scheme), got {value!r}")
        return value

    @field_validator("api_key", "tls_ca_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("tls_ca_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)!r} is not a readable file")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _public_url(self) -> UISettings:
        if self.api_public_url is None:
            self.api_public_url = self.api_url
        return self

    @property
    def api_key_value(self) -> str | None:
        """The key to send, or None."""
        return self.api_key.get_secret_value() if self.api_key is not None else None

    @property
    def docs_url(self) -> str:
        """Where a browser finds the HTTP API's interactive docs."""
        return f"{self.api_public_url or self.api_url}/docs"
