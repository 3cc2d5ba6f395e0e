"""Every setting of every service in one place: what exists, what is set, what looks misspelt.

The services read their settings with pydantic-settings (`common/settings.py`, plus each cloud
vendor's class beside its adapter). This module lists them all, so that `avatar-stack doctor` can
show them (secrets masked) and every command can warn at start about a variable that looks like a
setting but is none (`AVATAR_PROVDER=local` would otherwise be silently ignored).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from common.settings import Settings

# Names that look like settings but are read elsewhere on purpose (not by a settings class).
OTHER_KNOWN = frozenset(
    {
        "AVATAR_STACK_LIVEKIT",  # `avatar-stack up`: off = no dev-mode LiveKit
        "AVATAR_STACK_SETTINGS_CHECKED",  # set by `avatar-stack up` for its children: warned once already
        "AVATAR_SPEECH_CACHE",  # tests: where synthesized test speech is cached
        "GATEWAY_PUBLISH_PORT",  # docker-compose.yml: the host port of the gateway
        "GATEWAY_URL",  # clients (examples/, `say` in scripts): where the gateway is
        "LIVEKIT_SERVER_BIN",  # tests: another livekit-server binary
    }
)


def settings_classes() -> list[type[BaseSettings]]:
    """Shared settings first, then each cloud vendor's (imported lazily: they live in avatar_service)."""
    from avatar_service.providers.cloud import CloudSettings
    from avatar_service.providers.heygen import HeyGenSettings
    from avatar_service.providers.liveavatar import LiveAvatarSettings

    return [Settings, CloudSettings, HeyGenSettings, LiveAvatarSettings]


@dataclass(frozen=True)
class SettingInfo:
    env: str  # the environment variable
    owner: type[BaseSettings]
    field: str


def all_settings() -> list[SettingInfo]:
    out = []
    for cls in settings_classes():
        prefix = str(cls.model_config.get("env_prefix") or "")
        out.extend(SettingInfo(f"{prefix}{name}".upper(), cls, name) for name in cls.model_fields)
    return out


def setting_names() -> set[str]:
    return {s.env for s in all_settings()}


# In the environment, a variable of one of these families that is not a setting is probably a typo.
# (Generic families such as SESSION_ or LOG_ are left out: SESSION_MANAGER is a desktop's, not ours.)
# In `.env`, which belongs to this project, every unknown name is reported.
FAMILIES = (
    "AVATAR_", "STT_", "GATEWAY_", "DEEPGRAM_", "HEYGEN_", "LIVEAVATAR_", "LIVEKIT_", "LLM_",
    "LOCAL_STT_", "LOCAL_TTS_", "TURN_", "BARGE_IN_", "ECHO_",
)  # fmt: skip


def dotenv_names(path: Path = Path(".env")) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path).items()}


def unknown_settings(environ: Mapping[str, str] | None = None, dotenv: Path = Path(".env")) -> list[tuple[str, str]]:
    """(name, hint) for each variable of a settings family that no service reads, from the
    environment and `.env`; the hint names the closest real setting, if any."""
    names = setting_names()
    from_file = dotenv_names(dotenv)
    from_env = dict(os.environ if environ is None else environ)
    out = []
    for var in sorted({*from_file, *from_env}):
        upper = var.upper()
        if upper in names or upper in OTHER_KNOWN or upper.startswith("COMPOSE_"):
            continue
        if var not in from_file and not upper.startswith(FAMILIES):
            continue
        close = difflib.get_close_matches(upper, sorted(names), n=1, cutoff=0.75)
        out.append((var, f"did you mean {close[0]}?" if close else "no service reads it"))
    return out


def warn_unknown_settings(stream) -> int:
    found = unknown_settings()
    for var, hint in found:
        print(f"avatar-stack: warning: {var} is not a setting ({hint})", file=stream)
    return len(found)


def resolved(mask: bool = True) -> Iterator[tuple[str, Any, bool]]:
    """(ENV_NAME, value, set explicitly) for every setting as the services will see it."""
    for cls in settings_classes():
        instance = cls()
        prefix = str(cls.model_config.get("env_prefix") or "")
        explicit = instance.model_fields_set
        for name in cls.model_fields:
            value = getattr(instance, name)
            if isinstance(value, SecretStr):
                value = mask_secret(value.get_secret_value()) if mask else value.get_secret_value()
            elif mask and isinstance(value, str) and "://" in value:
                value = mask_url(value)
            yield f"{prefix}{name}".upper(), value, name in explicit


def mask_secret(secret: str) -> str:
    return "********" if secret else ""


def mask_url(url: str) -> str:
    """redis://user:password@host -> redis://user:********@host"""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":********@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
