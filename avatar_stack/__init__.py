"""avatar-stack: realtime talking avatars (the `avatar-stack` command, its client and tools)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("avatar-stack")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
