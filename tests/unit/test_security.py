"""The API key check and the security settings, without servers (tests/integration/test_security.py
has the protocols)."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionserve.errors import ErrorCode, VisionError
from visionserve.security import ApiKeyCheck, presented_key
from visionserve.settings import SecuritySettings, from_env

KEY = "k" * 12 + "-secret-part"


@pytest.mark.parametrize(
    ("authorization", "api_key", "presented"),
    [
        (None, None, None),
        (f"Bearer {KEY}", None, KEY),
        (f"bearer   {KEY} ", None, KEY),  # the scheme is case-insensitive; spaces around the token
        (f"BEARER {KEY}", None, KEY),
        ("Bearer", None, ""),  # a bearer without a token presents nothing that can match
        (f"Basic {KEY}", None, None),  # another scheme presents no key
        (f"Token {KEY}", None, None),
        (None, KEY, KEY),
        (f"Bearer other-{KEY}", KEY, KEY),  # X-API-Key wins when both are sent
    ],
)
def test_presented_key(authorization: str | None, api_key: str | None, presented: str | None) -> None:
    assert presented_key(authorization, api_key) == presented


def test_the_check_accepts_only_the_key() -> None:
    check = ApiKeyCheck(KEY)
    assert check.matches(KEY)
    for other in ("", KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, "é" + KEY[1:], "\udcff"):
        assert not check.matches(other), other
    check.check(f"Bearer {KEY}", None)
    check.check(None, KEY)


@pytest.mark.parametrize(
    ("authorization", "api_key", "fragment"),
    [
        (None, None, "needs an API key"),
        (f"Basic {KEY}", None, "needs an API key"),
        ("Bearer nope", None, "not valid"),
        (None, "nope", "not valid"),
    ],
)
def test_refusals_say_what_is_wrong_and_never_the_key(
    authorization: str | None, api_key: str | None, fragment: str
) -> None:
    with pytest.raises(VisionError) as caught:
        ApiKeyCheck(KEY).check(authorization, api_key)
    assert caught.value.code is ErrorCode.UNAUTHENTICATED and caught.value.status.http == 401
    assert caught.value.status.grpc == "UNAUTHENTICATED"
    assert fragment in caught.value.message and KEY not in caught.value.message


def test_an_empty_key_is_refused_by_the_check() -> None:
    with pytest.raises(ValueError, match="everyone"):
        ApiKeyCheck("")


def test_off_by_default_and_empty_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_env(SecuritySettings).resolved_api_key() is None
    monkeypatch.setenv("VISION_API_KEY", "")
    monkeypatch.setenv("VISION_TLS_CERT_FILE", "")
    monkeypatch.setenv("VISION_TLS_KEY_FILE", " ")
    settings = from_env(SecuritySettings)
    assert settings.resolved_api_key() is None and not settings.tls


def test_one_setting_turns_the_key_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_API_KEY", KEY)
    settings = from_env(SecuritySettings)
    assert settings.resolved_api_key() == KEY
    assert KEY not in repr(settings) and KEY not in str(settings)  # SecretStr


def test_the_key_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "key"
    secret.write_text(f"  {KEY}\n")
    monkeypatch.setenv("VISION_API_KEY_FILE", str(secret))
    assert from_env(SecuritySettings).resolved_api_key() == KEY


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"VISION_API_KEY": "short-key"}, "VISION_API_KEY: Value error, an API key must have at least 16"),
        ({"VISION_API_KEY": KEY, "VISION_API_KEY_FILE": "/etc/hostname"}, "not both"),
        (
            {"VISION_TLS_CERT_FILE": "/etc/hostname"},
            "needs both VISION_TLS_CERT_FILE and VISION_TLS_KEY_FILE",
        ),
        ({"VISION_TLS_KEY_FILE": "/etc/hostname"}, "needs both"),
        (
            {"VISION_TLS_CERT_FILE": "/no/such.pem", "VISION_TLS_KEY_FILE": "/etc/hostname"},
            "VISION_TLS_CERT_FILE='/no/such.pem' is not a readable file",
        ),
        (
            {"VISION_API_KEY_FILE": "/no/such/key"},
            "VISION_API_KEY_FILE='/no/such/key' is not a readable file",
        ),
    ],
)
def test_bad_settings_name_the_variable_and_never_echo_the_key(
    env: dict[str, str], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Exception, match="invalid settings") as caught:
        from_env(SecuritySettings)
    assert fragment in str(caught.value)
    assert "short-key" not in str(caught.value) and KEY not in str(caught.value)


def test_a_short_key_in_a_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "key"
    secret.write_text("tiny\n")
    monkeypatch.setenv("VISION_API_KEY_FILE", str(secret))
    with pytest.raises(Exception, match="fewer than 16 characters") as caught:
        from_env(SecuritySettings).resolved_api_key()
    assert "tiny" not in str(caught.value)
