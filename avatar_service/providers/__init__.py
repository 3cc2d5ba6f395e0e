"""Avatar drivers, one module per vendor, found by name: `AVATAR_PROVIDER=x` loads `providers/x.py`.

A cloud vendor's module offers `make_driver(settings, bus)` and `make_reaping(settings)`; nothing
here or in the reaper names a vendor, so adding one touches only its own module and its fake.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from types import ModuleType
from typing import TYPE_CHECKING

from avatar_service.driver import AvatarDriver
from common.bus import Bus
from common.settings import Settings

if TYPE_CHECKING:
    from avatar_service.providers.cloud import Reaping

log = logging.getLogger(__name__)

NOT_PROVIDERS = {"cloud", "vendor_api"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name not in NOT_PROVIDERS and not m.name.startswith("_"))


def _module(provider: str) -> ModuleType:
    if provider not in available():
        raise SystemExit(f"AVATAR_PROVIDER={provider} is not available; use one of: auto, {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{provider}")


def resolve_provider(settings: Settings) -> str:
    """`AVATAR_PROVIDER`, with `auto` = LiveAvatar when its key is set, else local. Never the legacy
    HeyGen streaming API, which HeyGen is deprecating in favour of LiveAvatar: that one only by name."""
    if settings.avatar_provider != "auto":
        return settings.avatar_provider
    from avatar_service.providers.liveavatar import LiveAvatarSettings

    return "liveavatar" if LiveAvatarSettings().api_key else "local"


def make_driver(settings: Settings, bus: Bus) -> AvatarDriver:
    provider = resolve_provider(settings)
    if settings.avatar_provider == "auto" and provider == "local":
        from avatar_service.providers.heygen import HeyGenSettings

        if HeyGenSettings().api_key:
            log.warning("HEYGEN_API_KEY is set but AVATAR_PROVIDER=auto never picks the deprecated HeyGen "
                        "Interactive Avatar; set AVATAR_PROVIDER=heygen to use it, or LIVEAVATAR_API_KEY")
    return _module(provider).make_driver(settings, bus)


def make_reaping(settings: Settings) -> Reaping | None:
    """The configured cloud vendor's reaping, or None (local avatar, no key, or turned off)."""
    make = getattr(_module(resolve_provider(settings)), "make_reaping", None)
    return make(settings) if make is not None else None
