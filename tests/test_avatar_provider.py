"""Which avatar `AVATAR_PROVIDER=auto` picks: LiveAvatar first, the deprecated HeyGen API only when named."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from avatar_service.providers import available, make_driver, resolve_provider
from common.settings import Settings


def test_auto_prefers_liveavatar_and_never_picks_legacy_heygen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEYGEN_API_KEY", "h")
    assert resolve_provider(Settings(_env_file=None, avatar_provider="auto")) == "local"
    monkeypatch.setenv("LIVEAVATAR_API_KEY", "l")
    assert resolve_provider(Settings(_env_file=None, avatar_provider="auto")) == "liveavatar"
    assert resolve_provider(Settings(_env_file=None, avatar_provider="heygen")) == "heygen"
    assert {"heygen", "liveavatar", "local"} <= set(available())  # providers are found by module name


def test_choosing_heygen_explicitly_warns_that_it_is_deprecated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HEYGEN_API_KEY", "h")
    settings = Settings(_env_file=None, avatar_provider="heygen")
    with caplog.at_level(logging.WARNING, logger="avatar_service.providers"):
        driver = make_driver(settings, SimpleNamespace(r=None, settings=settings))  # type: ignore[arg-type]
    assert driver.name == "heygen"
    assert any("deprecat" in r.getMessage() for r in caplog.records)


def test_an_unknown_provider_is_a_clear_start_up_error() -> None:
    with pytest.raises(SystemExit, match="not available"):
        make_driver(Settings(_env_file=None, avatar_provider="nope"), SimpleNamespace(r=None))  # type: ignore[arg-type]
