"""Avatar drivers, one module per vendor; `make_driver` picks one from the settings."""

from __future__ import annotations

from avatar_service.driver import AvatarDriver
from common.bus import Bus
from common.settings import Settings


def make_driver(settings: Settings, bus: Bus) -> AvatarDriver:
    provider = settings.resolved_avatar_provider()
    if provider == "heygen":
        from avatar_service.providers.heygen import HeyGenAvatarDriver

        return HeyGenAvatarDriver(settings, bus)
    if provider == "liveavatar":
        from avatar_service.providers.liveavatar import LiveAvatarDriver

        return LiveAvatarDriver(settings, bus)
    if provider != "local":
        raise SystemExit(
            f"AVATAR_PROVIDER={provider} is not available in this build yet; use AVATAR_PROVIDER=local"
        )
    from avatar_service.providers.local import LocalAvatarDriver

    return LocalAvatarDriver(settings, bus)
