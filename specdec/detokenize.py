"""Token ids -> text for outputs, streams and stop strings: decoded in context.

Sentencepiece tokenizers (Llama 2, Mistral, llama2.c's) drop the leading space of the
first token they decode, so the output ids alone decode to "was a" where the text after
the prompt is " was a". Every decode here therefore prepends a few context tokens (the
end of the prompt, or the tokens before a window) and keeps only what they add:

    text(ids | context) = decode(context + ids)[len(decode(context)):]

falling back to ``decode(ids)`` when the context's own text is not a prefix (a cleanup
rule of the tokenizer merged across the boundary).
"""

from __future__ import annotations

from collections.abc import Sequence

# tokens of context: enough for the tokenizer to see a word boundary (and a character
# split across byte tokens) before the decoded ids
CONTEXT_TOKENS = 4
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 character decodes to


def decode_after(tokenizer, context: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after ``context`` (see the module docstring)."""
    if not context:
        return tokenizer.decode(ids, skip_special_tokens=True)
    prefix = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(list(context) + list(ids), skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix):]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def output_text(tokenizer, ids: list[int], stop: tuple[str, ...] = (), prompt_ids: Sequence[int] = ()) -> str:
    """The text of generated ``ids`` after ``prompt_ids``, cut before the earliest stop string."""
    return _cut_at_stop(decode_after(tokenizer, list(prompt_ids)[-CONTEXT_TOKENS:], ids), stop)[0]


def stop_window_text(tokenizer, tokens: list[int], num_prompt: int, longest_stop: int) -> str:
    """The text of the last output tokens, enough to contain any stop string of up to
    ``longest_stop`` characters that ends there (trailing incomplete characters
    removed: they may still become something else).

    A stop string of m characters spans at most 4 m byte-level tokens, plus a few for a
    partial character at the window's start.
    """
    start = max(num_prompt, len(tokens) - (4 * longest_stop + 4))
    context = tokens[max(0, start - CONTEXT_TOKENS):start]
    return decode_after(tokenizer, context, tokens[start:]).rstrip(REPLACEMENT)


class TextStream:
    """Turns a growing list of output ids into text increments that never need revising.

    A character whose bytes are split across tokens decodes to U+FFFD until its last
    byte arrives, so trailing replacement characters are held back; so are the last
    ``len(longest stop) - 1`` characters, which could be the start of a stop string.
    ``prompt_ids`` give the decode its context (see the module docstring).

    >>> class Chars:  # a toy tokenizer: token id = code point
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(map(chr, ids))
    >>> stream = TextStream(Chars(), stop=("lo",))
    >>> stream.push([72, 101, 108], finished=False)  # "Hel": the "l" could start "lo"
    'He'
    >>> stream.push([72, 101, 108, 108, 111], finished=False)  # "Hello" holds "lo": cut there
    'l'
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.context = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = 0

    def push(self, ids: list[int], finished: bool) -> str:
        """The text that became final since the last call (possibly '')."""
        text = decode_after(self.tokenizer, self.context, ids)
        if not finished:
            text = text.rstrip(REPLACEMENT)  # a character still missing bytes: not final, not a match
        text, stopped = _cut_at_stop(text, self.stop)
        if not (finished or stopped):
            text = text[:max(self.sent, len(text) - self.hold)]
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece
