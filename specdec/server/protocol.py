"""OpenAI request bodies -> validated generation requests, and the OpenAI error shape.

Every check names the parameter and the accepted values, and runs before any work:
a body that fails one gets a 400 ``{"error": {"message", "type", "param", "code"}}``.
Parameters the engine cannot honour (log-probabilities, penalties, logit bias, tools,
echo, suffix, best_of > n) are refused with a 400 that says so unless they hold their
neutral value (null, 0, false, {}), which the engine honours trivially. Fields the API
does not define are refused as the OpenAI API refuses them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ..sampling_params import MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, MIN_TOP_P, SamplingParams

MAX_N = 128  # choices per prompt
MAX_SEQUENCES = 256  # prompts x n in one request
MAX_STOP = 4  # stop strings, as the OpenAI API allows
SEED_LIMIT = 2**63
ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered in the OpenAI shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """A validated body.

    kind:          "completion" or "chat"
    prompts:       completions: one entry per prompt (str or list of token ids)
    messages:      chat: the messages, checked ([{"role", "content": str}])
    params:        the SamplingParams of choice 0 of every prompt (choice j: seed + j)
    max_tokens:    None for a chat request that gave none (the rest of the context)
    n:             choices per prompt
    """

    kind: str
    model: str | None
    prompts: list = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """Choice ``choice``'s parameters: choices of one prompt differ by their seed."""
        seed = None if self.seed is None else (self.seed + choice) % SEED_LIMIT
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=seed, stop=self.stop, ignore_eos=self.ignore_eos)


# ---------------------------------------------------------------------------- fields
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
           "n", "user", "ignore_eos"}
_COMPLETION = _COMMON | {"prompt"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}

# parameter -> (its neutral values, why it cannot be honoured otherwise)
_NEUTRAL = {
    "logprobs": ((None, False), "log-probabilities are not implemented"),  # completions' 0 still asks for one
    "top_logprobs": ((None, 0), "log-probabilities are not implemented"),
    "echo": ((None, False), "echoing the prompt is not implemented"),
    "suffix": ((None, ""), "suffixes (insertion) are not implemented"),
    "presence_penalty": ((None, 0), "presence penalties are not implemented"),
    "frequency_penalty": ((None, 0), "frequency penalties are not implemented"),
    "repetition_penalty": ((None, 1), "repetition penalties are not implemented"),
    "logit_bias": ((None, {}), "logit bias is not implemented"),
    "tools": ((None, []), "tool calls are not implemented"),
    "tool_choice": ((None, "none"), "tool calls are not implemented"),
    "parallel_tool_calls": ((None,), "tool calls are not implemented"),
    "functions": ((None, []), "function calls are not implemented"),
    "function_call": ((None, "none"), "function calls are not implemented"),
    "response_format": ((None, {"type": "text"}), "structured output (response_format) is not implemented"),
}
_COMPLETION_NEUTRAL = ("logprobs", "echo", "suffix", "presence_penalty", "frequency_penalty",
                       "repetition_penalty", "logit_bias", "best_of")
_CHAT_NEUTRAL = ("logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "logit_bias", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                 "response_format")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _int(body: dict, name: str, lo: int, hi: int, default):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not lo <= value <= hi:
        raise invalid(name, f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}", "invalid_value")
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be true or false, got {value!r}", "invalid_type")
    return value


def _same(value, neutral) -> bool:
    """``value == neutral`` without True == 1 or False == 0."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return value == neutral


def _check_fields(body: dict, allowed: set[str], neutral: tuple[str, ...]) -> None:
    for name in body:
        if name in allowed:
            continue
        if name in neutral:
            value = body[name]
            if name == "best_of":
                if value is None or value == body.get("n", 1) or value == 1:
                    continue
                raise invalid(name, f"'best_of' other than n is not implemented (choices are returned as "
                                    f"generated, never ranked): omit it or set it to n, got {value!r}",
                              "unsupported_parameter")
            values, why = _NEUTRAL[name]
            if value is None or any(_same(value, v) for v in values if v is not None):
                continue
            raise invalid(name, f"'{name}' is not supported: {why}; omit it or leave it at its default",
                          "unsupported_parameter")
        raise invalid(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")


def _sampling(body: dict, req: GenerationRequest, max_tokens_name: str) -> None:
    req.model = body.get("model")
    if req.model is not None and not isinstance(req.model, str):
        raise invalid("model", f"'model' must be a string, got {req.model!r}", "invalid_type")
    t = body.get("temperature")
    if t is not None:
        if not _is_number(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise invalid("temperature", f"'temperature' must be 0 (greedy) or a number in "
                          f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}", "invalid_value")
        req.temperature = float(t)
    p = body.get("top_p")
    if p is not None:
        if not _is_number(p) or not MIN_TOP_P <= p <= 1:
            raise invalid("top_p", f"'top_p' must be a number in [{MIN_TOP_P:g}, 1], got {p!r}", "invalid_value")
        req.top_p = float(p)
    k = _int(body, "top_k", -1, MAX_TOP_K, 0)
    req.top_k = 0 if k == -1 else k  # -1 and 0 both disable it
    req.seed = _int(body, "seed", 0, SEED_LIMIT - 1, None)
    req.n = _int(body, "n", 1, MAX_N, 1)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
            raise invalid("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty "
                          f"strings, got {stop!r}", "invalid_value")
        req.stop = tuple(stops)
    req.ignore_eos = _bool(body, "ignore_eos")
    req.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true",
                          "invalid_value")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", f"'stream_options' must be an object with at most "
                          f"'include_usage', got {options!r}", "invalid_value")
        req.include_usage = _bool(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"'user' must be a string, got {user!r}", "invalid_type")
    req.max_tokens = _int(body, max_tokens_name, 1, 2**31 - 1, req.max_tokens)


def parse_completion(body) -> GenerationRequest:
    """POST /v1/completions body -> GenerationRequest (raises APIError 400).

    >>> parse_completion({"prompt": "def f(x):", "max_tokens": 8, "n": 2}).sampling_params(8, 1).max_tokens
    8
    >>> try:
    ...     parse_completion({"prompt": "def f(x):", "top_p": 2})
    ... except APIError as e:
    ...     print(e.status, e.body()["error"]["param"], "-", e.message)
    400 top_p - 'top_p' must be a number in [1e-06, 1], got 2
    """
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    _check_fields(body, _COMPLETION, _COMPLETION_NEUTRAL)
    req = GenerationRequest("completion", None)
    _sampling(body, req, "max_tokens")
    prompt = body.get("prompt")
    bad = invalid("prompt", "'prompt' must be a non-empty string, a non-empty list of non-empty strings, a "
                  f"list of token ids or a list of such lists; got {_short(prompt)}", "invalid_value")
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        raise bad
    for p in prompts:
        if isinstance(p, str) and not p:
            raise bad
        if isinstance(p, list) and (not p or not all(_is_int(t) and t >= 0 for t in p)):
            raise bad
    if len(prompts) * req.n > MAX_SEQUENCES:
        raise invalid("n", f"{len(prompts)} prompts x n={req.n} is more than the {MAX_SEQUENCES} sequences one "
                      "request may ask for", "invalid_value")
    req.prompts = prompts
    return req


def parse_chat(body) -> GenerationRequest:
    """POST /v1/chat/completions body -> GenerationRequest (raises APIError 400)."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    _check_fields(body, _CHAT, _CHAT_NEUTRAL)
    req = GenerationRequest("chat", None, max_tokens=None)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise invalid("max_completion_tokens", "give 'max_completion_tokens' or 'max_tokens', not both",
                      "invalid_value")
    _sampling(body, req, "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", f"'messages' must be a non-empty list of messages, got {_short(messages)}",
                      "invalid_value")
    checked = []
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(name, f"'{name}' must be an object with 'role' and 'content', got {_short(m)}",
                          "invalid_type")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"{name}.{sorted(extra)[0]}", f"'{name}' has unsupported field(s) {sorted(extra)}",
                          "unknown_parameter")
        if m.get("role") not in ROLES:
            raise invalid(f"{name}.role", f"'{name}.role' must be one of {', '.join(ROLES)}; got "
                          f"{_short(m.get('role'))}", "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       and set(part) <= {"type", "text"} for part in content):
                raise invalid(f"{name}.content", f"'{name}.content' parts must be text parts "
                              "({'type': 'text', 'text': ...}): other content is not supported", "invalid_value")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise invalid(f"{name}.content", f"'{name}.content' must be a string, got {_short(content)}",
                          "invalid_type")
        checked.append({"role": m["role"], "content": content})
    req.messages = checked
    if req.n > MAX_SEQUENCES:
        raise invalid("n", f"n must be at most {MAX_SEQUENCES}", "invalid_value")
    return req


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
