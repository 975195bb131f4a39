"""``Request``: a caller's handle on one request inside a shared engine.

The engine fills a request's sequence (tokens, finish reason, error) whoever steps it —
this caller, another ``generate()``, a paused ``stream()`` or a server's loop — so a
caller reads its own outputs from its handle, never from what a step returned:

    req = llm.submit("Once upon a time", SamplingParams(max_tokens=32))
    while not req.finished:
        llm.step()                       # or anyone else steps the engine
        print(req.new_text(), end="")    # text that became final since the last read
    print(req.new_text(), req.finish_reason)

``cancel()`` frees the request's cache blocks at once; it is a no-op once finished.
"""

from __future__ import annotations

from .detokenize import TextStream, output_text
from .sequence import RequestOutput, Sequence


class Request:
    """One submitted request.

    id:            the request id (``RequestOutput.request_id``)
    status:        'waiting' (queued or preempted), 'running' or 'finished'
    finish_reason: None while it runs, then 'stop', 'length', 'abort' (cancelled) or
                   'error' (``error`` holds the exception; the instance keeps serving)
    """

    def __init__(self, seq: Sequence, engine, tokenizer):
        self._seq, self._engine, self._tokenizer = seq, engine, tokenizer
        self._text = TextStream(tokenizer, seq.params.stop, seq.tokens[:seq.num_prompt]) if tokenizer else None
        self._ids_read = 0

    @property
    def id(self) -> int:
        return self._seq.seq_id

    @property
    def params(self):
        return self._seq.params

    @property
    def status(self) -> str:
        return self._seq.status.value

    @property
    def finished(self) -> bool:
        return self._seq.finished

    @property
    def finish_reason(self) -> str | None:
        return self._seq.finish_reason

    @property
    def error(self) -> BaseException | None:
        return self._seq.error

    @property
    def token_ids(self) -> list[int]:
        """Every token generated so far."""
        return self._seq.output_ids

    def new_token_ids(self) -> list[int]:
        """Tokens generated since the last call."""
        ids = self._seq.output_ids
        new, self._ids_read = ids[self._ids_read:], len(ids)
        return new

    def new_text(self) -> str:
        """Text that became final since the last call (possibly ''): a character split
        across tokens, or text that may begin a stop string, is held back until known;
        once the request has finished, everything left."""
        if self._text is None:
            raise ValueError("this model directory has no tokenizer: read new_token_ids() instead")
        return self._text.push(self._seq.output_ids, self._seq.finished)

    def output(self) -> RequestOutput:
        """The request's output so far (final once ``finished``)."""
        s = self._seq
        prompt_ids = s.tokens[:s.num_prompt]
        text = "" if self._tokenizer is None else output_text(self._tokenizer, s.output_ids, s.params.stop, prompt_ids)
        return RequestOutput(s.seq_id, s.prompt, prompt_ids, s.output_ids, text, s.finish_reason, s.metrics,
                             s.error)

    def cancel(self) -> None:
        """Stop the request (finish reason 'abort') and free its cache blocks now."""
        self._engine.cancel(self._seq)

    def __repr__(self) -> str:
        return f"Request(id={self.id}, status={self.status!r}, finish_reason={self.finish_reason!r})"
