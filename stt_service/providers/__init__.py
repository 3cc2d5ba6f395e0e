"""STT engines, one module per vendor; `make_engine` picks one from the settings."""

from __future__ import annotations

from common.settings import Settings
from stt_service.engine import SttEngine


def make_engine(settings: Settings) -> SttEngine:
    provider = settings.resolved_stt_provider()
    if provider == "deepgram":
        from stt_service.providers.deepgram import DeepgramEngine

        return DeepgramEngine(settings)
    from stt_service.providers.local import LocalSttEngine

    return LocalSttEngine(settings)
