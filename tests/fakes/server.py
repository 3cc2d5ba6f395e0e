"""Serving a FastAPI fake from a thread: uvicorn on a free loopback port, started and stopped by tests."""

from __future__ import annotations

import socket
import threading
import time
from typing import Self

import uvicorn
from fastapi import FastAPI


class ThreadedFake:
    """Base of the HTTP fakes: subclasses build `self.app`; this serves it on 127.0.0.1."""

    label = "fake"
    ws_impl = "auto"  # uvicorn's WebSocket implementation
    app: FastAPI
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """What the client's `*_URL` setting points at."""
        return self.base_url

    def start(self) -> Self:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False, ws=self.ws_impl)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.label} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
