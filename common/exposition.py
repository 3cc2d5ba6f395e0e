"""Prometheus exposition: the series of this project under one prefix."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

PREFIX = "avatar_stack_"
STANDARD = ("python_", "process_")  # prometheus-client's own process series keep their standard names


class PrefixedRegistry:
    """What `/metrics` serves: every series of this project under one prefix, `avatar_stack_`
    (`gateway_audio_frames_total` in the code is `avatar_stack_gateway_audio_frames_total` on the
    wire), so a Prometheus shared with other software tells ours apart. Added here, at exposition,
    so the names in the code stay short."""

    def __init__(self, registry=REGISTRY) -> None:
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            if family.name.startswith((PREFIX, *STANDARD)):
                yield family
                continue
            renamed = Metric(PREFIX + family.name, family.documentation, family.type, family.unit)
            renamed.samples = [s._replace(name=PREFIX + s.name) for s in family.samples]
            yield renamed


EXPOSED = PrefixedRegistry()
