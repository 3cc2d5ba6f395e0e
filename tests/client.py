"""The tests' browser: the package's client (`avatar_stack.client`), under the names tests use."""

from __future__ import annotations

from avatar_stack.client import Browser, Conversation, Session, SessionRefused, create_session, end_session

__all__ = ["Browser", "Conversation", "Session", "SessionRefused", "create_session", "end_session"]
