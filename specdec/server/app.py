"""The Starlette application: OpenAI-compatible routes over one ``EngineLoop``.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. Bodies are read with a size limit and validated by ``protocol`` (never a
framework's own 422); every error, the framework's 404/405 included, has the OpenAI
shape. Streams are Server-Sent Events that end with ``data: [DONE]``; a client that
goes away has its requests cancelled, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine_loop import EngineLoop, Handle
from .metrics import ServerMetrics
from .protocol import APIError, invalid, parse_chat, parse_completion
from .responses import respond

logger = logging.getLogger("specdec.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
_DISCARD_LIMIT = 8 << 20  # an oversized body is read (and dropped) up to this, so the client sees the 413


class ServerState:
    """What the routes share: the engine loop, metrics, options and the drain flag."""

    def __init__(self, llm, model_name: str, api_key: str | None = None, max_waiting: int | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_timeout: float = 30.0):
        self.llm = llm
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.shutdown_timeout = shutdown_timeout
        self.metrics = ServerMetrics()
        self.engine = EngineLoop(llm, self.metrics, max_waiting)
        self.handles: dict[str, Handle] = {}  # response id -> its in-flight engine requests
        self.draining = False
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin_drain(self) -> None:
        """Stop admitting; abort what is still in flight after ``shutdown_timeout`` seconds.
        Runs on the event loop (``request_drain`` gets it there from any thread)."""
        if self.draining:
            return
        self.draining = True
        logger.info("shutting down: no new requests; %d in flight get %.1f s to finish",
                    len(self.handles), self.shutdown_timeout)
        if math.isfinite(self.shutdown_timeout):
            loop = asyncio.get_running_loop()  # the server's loop (self.loop): request_drain calls us there
            loop.call_later(self.shutdown_timeout, lambda: loop.create_task(self.engine.abort_all()))

    def request_drain(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.begin_drain)

    # -- checks, in the order a request meets them --
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}' "
                           "(see GET /v1/models)", param="model", code="model_not_found")

    def check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and admits no new requests", type="server_error",
                           code="shutting_down", headers={"Retry-After": "5"})


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _endpoint(name: str, auth: bool = True):
    """Wrap a route: API key, APIError -> OpenAI error, anything else -> a 500 without a
    stack trace, and the response counted by endpoint and code."""
    def wrap(fn):
        async def route(request: Request):
            state: ServerState = request.app.state.server
            try:
                if auth:
                    state.check_key(request)
                response = await fn(state, request)
            except APIError as e:
                response = error_response(e)
            except Exception:
                logger.exception("unexpected error in %s", name)
                response = error_response(APIError(500, "The server had an error while processing your request.",
                                                   type="server_error", code="internal_error"))
            state.metrics.http_responses.labels(name, str(response.status_code)).inc()
            return response
        return route
    return wrap


async def _read_json(request: Request, limit: int):
    too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                         param=None, code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > _DISCARD_LIMIT:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DISCARD_LIMIT:
            break
    if size > limit:
        raise too_large
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise invalid(None, "We could not parse the JSON body of your request: it must be one JSON object "
                      "(Content-Type: application/json)", "invalid_json") from None


# ---------------------------------------------------------------------------- routes
@_endpoint("completions")
async def completions(state: ServerState, request: Request):
    arrival = time.perf_counter()
    req = parse_completion(await _read_json(request, state.max_body_bytes))
    state.check_model(req.model)
    state.check_admitting()
    handle = await state.engine.admit(req, req.prompts, arrival)
    return await respond(state, request, req, handle)


@_endpoint("chat_completions")
async def chat_completions(state: ServerState, request: Request):
    arrival = time.perf_counter()
    req = parse_chat(await _read_json(request, state.max_body_bytes))
    state.check_model(req.model)
    tokenizer = state.llm.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise invalid("messages", f"the model '{state.model_name}' has no chat template (its tokenizer_config.json "
                      "sets no 'chat_template'), so chat messages cannot be rendered into a prompt: use "
                      "/v1/completions with a prompt, or serve a model whose tokenizer has a chat template",
                      "chat_template_missing")
    ids = await state.engine.encode(_render_chat, tokenizer, req.messages)
    state.check_admitting()
    handle = await state.engine.admit(req, [ids], arrival)
    return await respond(state, request, req, handle)


def _render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template's prompt (with the assistant's turn opened) as token ids."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own checks (e.g. roles must alternate)
        raise invalid("messages", f"the model's chat template rejected the messages: {e}", "invalid_value") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise invalid("messages", "the messages render to an empty prompt", "invalid_value")
    return ids


@_endpoint("models")
async def models(state: ServerState, request: Request):
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "specdec",
            "max_model_len": state.llm.config.max_position_embeddings}
    return JSONResponse({"object": "list", "data": [card]})


@_endpoint("health", auth=False)
async def health(state: ServerState, request: Request):
    if state.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return JSONResponse({"status": "ok"})


@_endpoint("metrics", auth=False)
async def metrics(state: ServerState, request: Request):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: HTTPException):
    state: ServerState = request.app.state.server
    if exc.status_code == 404:
        error = APIError(404, f"Invalid URL ({request.method} {request.url.path}): no such route",
                         code="unknown_url")
    elif exc.status_code == 405:
        error = APIError(405, f"Method {request.method} is not allowed for {request.url.path}",
                         code="method_not_allowed")
    else:
        error = APIError(exc.status_code, str(exc.detail), code=None)
    state.metrics.http_responses.labels("other", str(error.status)).inc()
    return error_response(error)


async def _server_error(request: Request, exc: Exception):
    return error_response(APIError(500, "The server had an error while processing your request.",
                                   type="server_error", code="internal_error"))


# ---------------------------------------------------------------------------- the app
def create_app(llm, model_name: str = "specdec", *, api_key: str | None = None, max_waiting: int | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_timeout: float = 30.0) -> Starlette:
    """An ASGI app serving ``llm`` (it must not be used elsewhere while the app runs).

    model_name:       the name GET /v1/models lists and requests may give as 'model'
    api_key:          require 'Authorization: Bearer <api_key>' on /v1/* (None: open)
    max_waiting:      refuse new requests with 503 + Retry-After while this many wait
    max_body_bytes:   larger bodies get 413
    shutdown_timeout: seconds in-flight requests get to finish after SIGTERM before they
                      are aborted (finish_reason 'abort')
    """
    if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                    or max_waiting < 1):
        raise ValueError(f"max_waiting must be None or an integer >= 1, got {max_waiting!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    if not shutdown_timeout >= 0:
        raise ValueError(f"shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}")
    state = ServerState(llm, model_name, api_key, max_waiting, max_body_bytes, float(shutdown_timeout))

    @asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        state.engine.start()
        try:
            yield
        finally:
            await state.engine.stop()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    # each handler takes its own exception type: starlette's Mapping type cannot say so
    handlers: dict[Any, Callable[..., Any]] = {HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.server = state
    return app
