"""Writing a generation's results: one JSON body, or a Server-Sent Events stream.

Both read the same per-choice events from the handle's queue (text that became final,
token counts, the finish), so a seeded request gives the same text either way. A client
that goes away has its unfinished requests cancelled: the stream's generator is closed
when Starlette sees the disconnect, and a non-streamed request watches for it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .engine_loop import Event, Handle
from .protocol import APIError, GenerationRequest


def _specdec(event: Event) -> dict:
    return {"acceptance_rate": event.acceptance_rate, "mean_accepted_length": event.mean_accepted_length}


async def respond(state, request: Request, req: GenerationRequest, handle: Handle):
    rid = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    state.handles[rid] = handle
    if req.stream:
        return _EventStream(state, req, handle, rid)
    try:
        return await _complete(state, request, req, handle, rid)
    finally:
        state.handles.pop(rid, None)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(state, request: Request, req: GenerationRequest, handle: Handle, rid: str):
    n = len(handle.choices)
    texts: list[str] = [""] * n
    finals: list[Event | None] = [None] * n

    async def collect():
        left = n
        while left:
            event = await handle.queue.get()
            texts[event.index] += event.text
            if event.finish_reason is not None:
                finals[event.index] = event
                left -= 1

    done = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():  # the client left (or this task was cancelled): free the blocks
            done.cancel()
            state.engine.cancel_soon(handle)
    if not done.done() or done.cancelled():
        return Response(status_code=499)  # nobody reads it
    ended = cast(list[Event], finals)  # collect() returned: every choice has its final event
    failed = next((f for f in ended if f.finish_reason == "error"), None)
    if failed is not None:
        raise APIError(500, f"generation failed: {failed.error}", type="server_error", code="generation_error")
    choices = []
    for i, (text, final) in enumerate(zip(texts, ended, strict=True)):
        choice: dict[str, object] = {"index": i, "logprobs": None, "finish_reason": final.finish_reason,
                                     "specdec": _specdec(final)}
        if req.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    completion = sum(f.completion_tokens for f in ended)
    return JSONResponse({
        "id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": int(time.time()), "model": state.model_name, "choices": choices,
        "usage": {"prompt_tokens": handle.prompt_tokens, "completion_tokens": completion,
                  "total_tokens": handle.prompt_tokens + completion},
    })


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(state, req: GenerationRequest, handle: Handle, rid: str):
    chat = req.kind == "chat"
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": state.model_name}

    def chunk(index: int, text: str, event: Event | None = None, role: bool = False) -> str:
        choice: dict[str, object] = {"index": index}
        if chat:
            choice["delta"] = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
        else:
            choice["text"], choice["logprobs"] = text, None
        choice["finish_reason"] = None if event is None else event.finish_reason
        if event is not None:
            choice["specdec"] = _specdec(event)
        return _sse(head | {"choices": [choice]})

    left, completion, error = len(handle.choices), 0, None
    if chat:
        for c in handle.choices:
            yield chunk(c.index, "", role=True)
    while left:
        event = await handle.queue.get()
        if event.finish_reason is None:
            if event.text:
                yield chunk(event.index, event.text)
            continue
        left -= 1
        completion += event.completion_tokens
        error = error or event.error
        yield chunk(event.index, event.text, event)
    if error is not None:
        yield _sse({"error": {"message": f"generation failed: {error}", "type": "server_error",
                              "param": None, "code": "generation_error"}})
    if req.include_usage:
        yield _sse(head | {"choices": [], "usage": {"prompt_tokens": handle.prompt_tokens,
                                                    "completion_tokens": completion,
                                                    "total_tokens": handle.prompt_tokens + completion}})
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that, however it ends (finished, client gone before or during the
    stream, server cancelled), cancels the handle's unfinished requests at once."""

    def __init__(self, state, req: GenerationRequest, handle: Handle, rid: str):
        super().__init__(_stream(state, req, handle, rid), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._state, self._handle, self._rid = state, handle, rid

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._state.handles.pop(self._rid, None)
            self._state.engine.cancel_soon(self._handle)  # a no-op for finished requests
