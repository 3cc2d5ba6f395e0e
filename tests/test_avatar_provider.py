"""Which avatar `AVATAR_PROVIDER=auto` picks: LiveAvatar first, the deprecated HeyGen API only when named."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from avatar_service.providers import make_driver
from common.settings import Settings


def test_auto_prefers_liveavatar_and_never_picks_legacy_heygen() -> None:
    both = Settings(avatar_provider="auto", heygen_api_key="h", liveavatar_api_key="l")
    assert both.resolved_avatar_provider() == "liveavatar"
    assert Settings(avatar_provider="auto", heygen_api_key="h").resolved_avatar_provider() == "local"
    assert Settings(avatar_provider="heygen", heygen_api_key="h").resolved_avatar_provider() == "heygen"


def test_choosing_heygen_explicitly_warns_that_it_is_deprecated(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(avatar_provider="heygen", heygen_api_key="h", heygen_avatar_id="a")
    with caplog.at_level(logging.WARNING, logger="avatar_service.providers"):
        driver = make_driver(settings, SimpleNamespace(r=None, settings=settings))  # type: ignore[arg-type]
    assert driver.name == "heygen"
    assert any("deprecat" in r.getMessage() for r in caplog.records)
