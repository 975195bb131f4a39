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

Also here: the checks of what callers pass (prompts, parameter lists, conversations),
run before anything is queued, and the text stream of one request.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator

from .detokenize import TextStream, output_text
from .sampling_params import SamplingParams
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


def run_to_completion(requests: list[Request], step: Callable[[Request], None],
                      progress: Callable[[int], object]) -> None:
    """Call ``step(r)`` for an unfinished request ``r`` until all of ``requests`` have
    finished, ``progress(n)`` as n more finish; a failed one's error is raised at once
    (the caller cancels the rest)."""
    pending = [r for r in requests if not r.finished]
    progress(len(requests) - len(pending))
    while pending:
        step(pending[0])
        failed = next((r for r in requests if r.finish_reason == "error"), None)
        if failed is not None:
            raise failed.error or RuntimeError(f"request {failed.id} failed")
        still = [r for r in pending if not r.finished]
        progress(len(pending) - len(still))
        pending = still


def stream_text(start: Callable[[], Request], step: Callable[[Request], None]) -> Iterator[str]:
    """Yield a request's text in increments: ``start()`` queues it when iteration begins,
    ``step(request)`` advances the engine while it is unfinished. Raises the request's
    error if it fails; cancels it when the consumer stops early (``break``, an
    exception, ``close()``)."""
    request = start()
    try:
        while True:
            done = request.finished  # read before the flush: the flush then holds everything
            piece = request.new_text()
            if piece:
                yield piece  # others may step the engine (and finish this request) meanwhile
            if done:
                break
            if not request.finished:
                step(request)
        if request.finish_reason == "error":
            raise request.error or RuntimeError(f"request {request.id} failed")
    finally:
        request.cancel()  # a no-op once finished


# ---------------------------------------------------------------------- caller input


def is_token_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def is_prompt(prompt) -> bool:
    """One prompt: a str or a non-empty list / tuple of integer token ids."""
    return isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt) and
                                       all(is_token_id(t) for t in prompt))


def is_conversation(messages) -> bool:
    """One chat conversation: a non-empty list of {"role": str, "content": ...} dicts."""
    return (isinstance(messages, (list, tuple)) and bool(messages) and
            all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages))


def conversation_list(messages) -> list:
    """``chat(messages)``'s conversations: ``messages`` itself when it is one conversation, else its items.

    Raises ValueError when ``messages`` is neither one conversation nor a non-empty list of them.
    """
    conversations = [messages] if is_conversation(messages) else messages
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("messages must be a conversation (a list of {'role', 'content'} dicts) or a "
                         "non-empty list of conversations")
    return list(conversations)


def pair_prompts(prompts, params) -> list[tuple[object, SamplingParams]]:
    """(prompt, SamplingParams) per prompt of ``generate(prompts, params)``: one prompt or a
    list; None, one SamplingParams for all, or one per prompt."""
    if is_prompt(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a str, a list of str, or a list of token-id lists (non-empty)")
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: pass one, or one per prompt")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not SamplingParams")
    return list(zip(prompts, params, strict=True))


def encode_prompt(i: int, prompt, params: SamplingParams, tokenizer, vocab_size: int,
                  max_context: int) -> tuple[list[int], str | None]:
    """(token ids, text or None) of prompt ``i`` (a str or token ids), checked against
    the vocabulary and the context with ``params`` (whose defaults are resolved)."""
    if params.stop and tokenizer is None:
        raise ValueError(f"params[{i}] has stop strings {params.stop}, but stop strings need a tokenizer "
                         "and this model directory has none: use stop_token_ids")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if tokenizer is None:
            raise ValueError("this model directory has no tokenizer: pass prompts as token-id lists")
        ids, text = tokenizer.encode(prompt), prompt
    elif isinstance(prompt, (list, tuple)):
        ids, text = list(prompt), None
        if not ids:
            raise ValueError(f"prompt {i} is an empty token list")
        bad = [t for t in ids if not is_token_id(t) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
        ids = [int(t) for t in ids]
    else:
        raise TypeError(f"prompt {i} is a {type(prompt).__name__}; expected str or list of int")
    if len(ids) > max_context or (len(ids) == max_context and params.max_tokens > 0):
        raise ValueError(f"prompt {i} has {len(ids)} tokens but the model's context is {max_context} tokens: "
                         "shorten the prompt")
    return ids, text


def render_conversation(tokenizer, conversation, chat_template: str | None) -> list[int]:
    """The token ids of ``conversation`` rendered with the tokenizer's chat template (or
    ``chat_template``), ending with the assistant turn's opening."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer with a chat template and this model directory has no "
                         "tokenizer: pass token ids to generate()")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template (no chat_template in its "
                         "tokenizer_config.json or chat_template.jinja): it is likely a base model; format "
                         "the prompt yourself and call generate(), or pass chat_template=")
    if not is_conversation(conversation):
        raise ValueError("a conversation must be a non-empty list of {'role': str, 'content': str} dicts, "
                         f"got {conversation!r:.200}")
    ids = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)
