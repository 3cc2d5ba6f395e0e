"""`avatar_stack_build_info{service, version, python}` = 1: which build each process runs, for
dashboards (a rollout shows as two versions side by side) and alerts."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import Gauge

# Exposed as avatar_stack_build_info (common/metrics.py adds the prefix to every series).
BUILD_INFO = Gauge("build_info", "The running build (always 1)", ["service", "version", "python"])


def package_version() -> str:
    try:
        return version("avatar-stack")
    except PackageNotFoundError:  # a checkout that was never installed
        return "0+unknown"


def set_build_info(service: str) -> None:
    BUILD_INFO.labels(service, package_version(), platform.python_version()).set(1)
