"""``specdec serve``: an OpenAI-compatible HTTP server over one ``LLM``.

    app = create_app(llm, "my-model")          # a Starlette (ASGI) app
    serve(llm, host="127.0.0.1", port=8000)      # uvicorn, SIGTERM drains then exits

``ServerThread`` runs one in a background thread on a free loopback port (tests, the
load benchmark).
"""

from __future__ import annotations

import math
import signal
import socket
import threading
import time

import uvicorn

from .app import DEFAULT_MAX_BODY_BYTES, ServerState, create_app
from .protocol import APIError

__all__ = ["APIError", "ServerThread", "create_app", "serve"]


class _Server(uvicorn.Server):
    """uvicorn's server, with SIGTERM / SIGINT first telling the app to stop admitting and
    to give in-flight requests ``shutdown_timeout`` seconds before aborting them."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        self.state.request_drain()
        super().handle_exit(sig, frame)


def _config(app, state: ServerState, **kw) -> uvicorn.Config:
    # uvicorn's own wait for connections is a backstop behind the app's drain timeout
    grace = math.ceil(state.shutdown_timeout) + 5 if state.shutdown_timeout < float("inf") else None  # whole seconds
    return uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=grace, **kw)


def serve(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          max_waiting: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGTERM / SIGINT: then stop admitting (503), let in-flight requests
    finish for ``shutdown_timeout`` seconds, abort the rest, and return."""
    app = create_app(llm, model_name, api_key=api_key, max_waiting=max_waiting, max_body_bytes=max_body_bytes,
                     shutdown_timeout=shutdown_timeout)
    state = app.state.server
    server = _Server(_config(app, state, host=host, port=port, log_level=log_level), state)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in
    # place that re-raise is a no-op, so a drained server exits with status 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerThread:
    """A server for ``llm`` in a background thread on ``host`` and a free port.

    >>> with ServerThread(llm, "demo") as server:                   # doctest: +SKIP
    ...     httpx.get(server.url + "/health")
    """

    def __init__(self, llm, model_name: str = "specdec", host: str = "127.0.0.1", **options):
        self.app = create_app(llm, model_name, **options)
        self.state: ServerState = self.app.state.server
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = _Server(_config(self.app, self.state, log_level="warning"), self.state)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="specdec-server", daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def terminate(self) -> None:
        """What SIGTERM does: stop admitting, drain, shut down (returns at once)."""
        self.server.handle_exit(signal.SIGTERM, None)

    def join(self, timeout: float = 60.0) -> bool:
        """Wait for the server to exit; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        self.terminate()
        if not self.join(timeout):
            raise RuntimeError(f"the server did not stop within {timeout} s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running:
            self.stop()
