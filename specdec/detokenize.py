"""Token ids -> text for outputs and streams: stop-string cuts and safe increments."""

from __future__ import annotations


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def output_text(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> str:
    """The text of generated ``ids``, cut before the earliest stop string."""
    return _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[0]


class TextStream:
    """Turns a growing list of output ids into text increments that never need revising.

    A character whose bytes are split across tokens decodes to U+FFFD until its last
    byte arrives, so trailing replacement characters are held back; so are the last
    ``len(longest stop) - 1`` characters, which could be the start of a stop string.

    >>> class Chars:  # a toy tokenizer: token id = code point
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(map(chr, ids))
    >>> stream = TextStream(Chars(), stop=("lo",))
    >>> stream.push([72, 101, 108], finished=False)  # "Hel": the "l" could start "lo"
    'He'
    >>> stream.push([72, 101, 108, 108, 111], finished=False)  # "Hello" holds "lo": cut there
    'l'
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = 0

    def push(self, ids: list[int], finished: bool) -> str:
        """The text that became final since the last call (possibly '')."""
        text, stopped = _cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)
        if not (finished or stopped):
            text = text.rstrip("\ufffd")  # a character still missing bytes
            text = text[:max(self.sent, len(text) - self.hold)]
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece
