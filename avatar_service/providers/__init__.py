"""Avatar drivers, one module per vendor; `make_driver` picks one from the settings."""

from __future__ import annotations

import logging

from avatar_service.driver import AvatarDriver
from common.bus import Bus
from common.settings import Settings

log = logging.getLogger(__name__)

HEYGEN_DEPRECATED = (
    "AVATAR_PROVIDER=heygen uses HeyGen's legacy Interactive Avatar streaming API, which HeyGen is "
    "deprecating in favour of LiveAvatar; move to AVATAR_PROVIDER=liveavatar (LIVEAVATAR_API_KEY)"
)


def make_driver(settings: Settings, bus: Bus) -> AvatarDriver:
    provider = settings.resolved_avatar_provider()
    if settings.avatar_provider == "auto" and settings.heygen_api_key and provider == "local":
        log.warning("HEYGEN_API_KEY is set but AVATAR_PROVIDER=auto never picks the deprecated HeyGen "
                    "Interactive Avatar; set AVATAR_PROVIDER=heygen to use it, or LIVEAVATAR_API_KEY")
    if provider == "heygen":
        log.warning(HEYGEN_DEPRECATED)
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
