"""The one loop that steps the engine for every HTTP client.

One ``LLM`` is single-threaded, so everything that touches it — tokenizing and admitting
requests, ``step()``, reading new text, cancelling — runs in one worker thread
(``ThreadPoolExecutor(max_workers=1)``), in the order it was asked for. The asyncio
event loop only waits on that thread, so it keeps accepting and streaming while a step
runs. After each step the worker collects every active choice's new tokens and text and
the loop hands them to the waiting handlers' queues:

    handler --admit()--> worker: encode, check, llm.submit() x (prompts x n) -> Handle
    loop task: while work: worker: llm.step(); collect events -> handle.queue.put(event)
    handler <-- events (text, token count, finish) --> SSE chunks / one JSON body
    disconnect -> cancel_soon(handle) -> worker: request.cancel() (blocks freed at once)
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..kv_cache import CacheCapacityError
from ..request import Request
from .metrics import ServerMetrics
from .protocol import APIError, GenerationRequest, invalid

logger = logging.getLogger("specdec.server")

@dataclass
class Event:
    """What one step produced for one choice."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    completion_tokens: int = 0  # set when finished
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    error: str | None = None


@dataclass
class Choice:
    index: int
    request: Request
    handle: Handle
    arrival: float
    started: bool = False


@dataclass
class Handle:
    """One HTTP request's engine requests (prompts x n choices) and its event queue."""

    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def request_ids(self) -> list[int]:
        return [c.request.id for c in self.choices]


class Overloaded(APIError):
    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(503, message, type="server_error", code="overloaded",
                         headers={"Retry-After": str(retry_after)})


class EngineLoop:
    """Steps ``llm`` for every client; see the module docstring."""

    def __init__(self, llm, metrics: ServerMetrics, max_waiting: int | None = None):
        self.llm = llm
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.steps = 0  # engine steps run by this loop (read by tests and /health)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specdec-engine")
        self._active: dict[int, Choice] = {}  # worker thread only
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._has_work = False
        self._stopping = False
        self._closed = False  # the worker is shut down

    # ------------------------------------------------------------------ lifecycle (event loop)
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="specdec-engine-loop")

    async def stop(self) -> None:
        """Abort what is left (finish reason 'abort'), end the loop task and the worker."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        await self.abort_all()
        self._closed = True
        self._executor.shutdown(wait=True)

    def _wake_event(self) -> asyncio.Event:
        if self._wake is None:
            raise RuntimeError("EngineLoop.start() must run (in the event loop) before requests are admitted")
        return self._wake

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        while not self._stopping:
            if not self._has_work:
                await self._wake_event().wait()
                self._wake_event().clear()
                continue
            try:
                events, self._has_work = await self._call(self._step)
            except Exception as error:  # the engine keeps request failures to themselves; anything
                logger.exception("engine step failed")  # else ends the requests in flight, not the server
                events, self._has_work = await self._call(self._fail_all, error), False
            self._deliver(events)

    @staticmethod
    def _deliver(events: list[tuple[Handle, Event]]) -> None:
        for handle, event in events:
            handle.queue.put_nowait(event)

    # ------------------------------------------------------------------ calls from handlers
    async def admit(self, req: GenerationRequest, prompts: list, arrival: float) -> Handle:
        """Queue every choice of a validated request (prompts: str or token-id lists);
        raises APIError (400 / 503) with nothing queued."""
        handle = await self._call(self._admit, req, prompts, arrival)
        self._has_work = True
        self._wake_event().set()
        return handle

    async def encode(self, fn, *args):
        """Run ``fn(*args)`` on the worker (tokenizer work that must not race a step)."""
        return await self._call(fn, *args)

    def cancel_soon(self, handle: Handle) -> None:
        """Cancel a handle's unfinished choices on the worker, after the current step;
        safe to call from a ``finally`` of a cancelled task (it does not wait)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()

        def deliver(future):
            try:
                loop.call_soon_threadsafe(self._deliver, future.result())
            except RuntimeError:  # the event loop has closed: nobody waits for these events
                pass

        self._executor.submit(self._cancel, handle).add_done_callback(deliver)

    async def abort_all(self) -> None:
        """Cancel every active choice (finish reason 'abort'); their streams end normally."""
        if not self._closed:
            self._deliver(await self._call(self._abort_all))

    # ------------------------------------------------------------------ worker thread
    def _admit(self, req: GenerationRequest, prompts: list, arrival: float) -> Handle:
        llm = self.llm
        if self.max_waiting is not None and (waiting := llm.load().waiting) >= self.max_waiting:
            raise Overloaded(f"{waiting} requests are already waiting (--max-waiting "
                             f"{self.max_waiting}): retry later")
        context = llm.config.max_position_embeddings
        tokenized = []
        param = "messages" if req.kind == "chat" else "prompt"
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str) and llm.tokenizer is None:
                raise invalid(param, "this model directory has no tokenizer: send prompts as lists of token ids",
                              "invalid_value")
            ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            bad = [t for t in ids if t >= llm.config.vocab_size]
            if bad:
                raise invalid(param, f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary "
                              f"[0, {llm.config.vocab_size})", "invalid_value")
            max_tokens = req.max_tokens if req.max_tokens is not None else context - len(ids)
            if len(ids) >= context or len(ids) + max_tokens > context:
                which = param if len(ids) >= context or req.max_tokens is None else "max_tokens"
                raise invalid(which, f"This model's maximum context length is {context} tokens. However, you "
                              f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                              f"{'messages' if req.kind == 'chat' else 'prompt'}, {max_tokens} for the "
                              "completion). Please reduce the length of the prompt or max_tokens.",
                              "context_length_exceeded")
            tokenized.append((prompt, ids, max_tokens))
        handle = Handle()
        try:
            for prompt, ids, max_tokens in tokenized:
                handle.prompt_tokens += len(ids)
                for j in range(req.n):
                    request = llm.submit(prompt, req.sampling_params(max_tokens, j))
                    handle.choices.append(Choice(len(handle.choices), request, handle, arrival))
        except (CacheCapacityError, ValueError, TypeError) as e:
            for c in handle.choices:
                c.request.cancel()
            code = "kv_cache_exceeded" if isinstance(e, CacheCapacityError) else "invalid_value"
            raise invalid("max_tokens" if isinstance(e, CacheCapacityError) else None, str(e), code) from None
        for c in handle.choices:
            self._active[c.request.id] = c
        self.metrics.prompt_tokens.inc(handle.prompt_tokens)
        self.metrics.refresh(llm)
        return handle

    def _step(self) -> tuple[list, bool]:
        llm = self.llm
        start = time.perf_counter()
        finished = llm.step()
        now = time.perf_counter()
        batch = llm.load().running + len(finished)
        if batch:
            self.steps += 1
            self.metrics.steps.inc()
            self.metrics.step_seconds.observe(now - start)
            self.metrics.step_batch.observe(batch)
        events = [e for c in list(self._active.values()) if (e := self._collect(c, now)) is not None]
        self.metrics.refresh(llm)
        return events, llm.has_work()

    def _collect(self, choice: Choice, now: float):
        request = choice.request
        ids = request.new_token_ids()
        text = request.new_text() if self.llm.tokenizer is not None else ""
        if ids and not choice.started:
            choice.started = True
            self.metrics.ttft.observe(now - choice.arrival)
        self.metrics.generation_tokens.inc(len(ids))
        if not request.finished:
            return (choice.handle, Event(choice.index, text, len(ids))) if ids or text else None
        del self._active[request.id]
        out = request.output()
        self.metrics.requests.labels(request.finish_reason).inc()
        return choice.handle, Event(choice.index, text, len(ids), request.finish_reason, len(out.token_ids),
                                    out.metrics.acceptance_rate, out.metrics.mean_accepted_length,
                                    None if out.error is None else f"{type(out.error).__name__}: {out.error}")

    def _cancel(self, handle: Handle) -> list:
        events = []
        for c in handle.choices:
            if c.request.id in self._active:
                c.request.cancel()
                events.append(self._collect(c, time.perf_counter()))
        self.metrics.refresh(self.llm)
        return events

    def _abort_all(self) -> list:
        events = []
        for c in list(self._active.values()):
            c.request.cancel()
            events.append(self._collect(c, time.perf_counter()))
        self.metrics.refresh(self.llm)
        return events

    def _fail_all(self, error: Exception) -> list:
        """After a step raised outside any request: end every active request with reason
        'error' (their blocks freed) so that no client waits forever."""
        events = []
        for c in list(self._active.values()):
            c.request.cancel()
            del self._active[c.request.id]
            self.metrics.requests.labels("error").inc()
            events.append((c.handle, Event(c.index, c.request.new_text() if self.llm.tokenizer else "",
                                           len(c.request.new_token_ids()), "error", len(c.request.token_ids),
                                           error=f"{type(error).__name__}: {error}")))
        self.metrics.refresh(self.llm)
        return events
