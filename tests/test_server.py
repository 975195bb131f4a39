"""`specdec serve`: the OpenAI-compatible server on the embedded demo pair.

Servers run in a background thread on 127.0.0.1 and a free port, all over one module-wide
``LLM`` (torch backend, CPU) that is only ever driven by one server at a time; the
offline references are generated on that same ``LLM`` before any server starts. One test
starts the real ``specdec serve`` in a subprocess and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specdec import LLM, SamplingParams
from specdec.demo import SNIPPETS, demo_dirs
from specdec.models import ModelConfig
from specdec.server import ServerThread
from specdec.server.load import drive

MODEL = "specdec-demo"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 << 10
SEEDED = dict(max_tokens=16, temperature=0.8, top_p=0.95, seed=1234)
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
N_CLIENTS, CLIENT_TOKENS = 64, 3


def _params(max_tokens, temperature, top_p, seed, ignore_eos=False):
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          ignore_eos=ignore_eos)


def _client_request(i: int) -> dict:
    return dict(prompt=SNIPPETS[i % len(SNIPPETS)], max_tokens=CLIENT_TOKENS, temperature=1.0, top_p=1.0, seed=i)


@pytest.fixture(scope="module")
def llm():
    target, draft = demo_dirs()[:2]
    return LLM(target, draft=draft, num_draft_tokens=3, device="cpu", backend="torch", seed=0, adaptive=False)


@pytest.fixture(scope="module")
def small():
    """Plain decoding of the demo target, one sequence at a time, a KV cache of 11 blocks of 16 tokens."""
    target = demo_dirs().target
    cfg = ModelConfig.from_file(target)
    block_bytes = 16 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, fp32
    return LLM(target, device="cpu", backend="torch", max_num_seqs=1, kv_cache_memory=12 * block_bytes)


@pytest.fixture(scope="module")
def references(llm):
    """Offline LLM.generate outputs for what the tests later ask the server."""
    tok = llm.tokenizer
    chat_ids = tok.encode(tok.apply_chat_template(CHAT, chat_template=TEMPLATE, tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
    seeded = llm.generate(SNIPPETS[0], _params(**SEEDED))[0]
    n2 = llm.generate([SNIPPETS[1], SNIPPETS[1], SNIPPETS[2], SNIPPETS[2]],
                      [_params(**{**SEEDED, "seed": 1234 + j % 2}) for j in range(4)])
    chat = llm.generate([chat_ids], _params(**SEEDED))[0]
    clients = llm.generate([_client_request(i)["prompt"] for i in range(N_CLIENTS)],
                           [_params(**{k: v for k, v in _client_request(i).items() if k != "prompt"},
                                    ignore_eos=True) for i in range(N_CLIENTS)])
    return {"seeded": seeded, "n2": [o.text for o in n2], "chat": chat, "clients": [o.text for o in clients]}


@pytest.fixture(scope="module")
def server(llm, references):
    with ServerThread(llm, MODEL, api_key=KEY, max_body_bytes=BODY_LIMIT) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _on_worker(server, fn):
    """Run ``fn()`` on the server's engine thread, between two steps."""
    return asyncio.run_coroutine_threadsafe(server.state.engine.encode(fn), server.state.loop).result(30)


def _idle(server, llm) -> bool:
    return _on_worker(server, lambda: not llm.has_work() and llm.blocks.num_free_blocks == llm.blocks.num_blocks)


def _next_event(lines) -> dict:
    """The next ``data:`` JSON payload of an SSE line iterator."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])
    raise AssertionError("the stream ended")


def _wait_idle(server, llm, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _idle(server, llm):
        assert time.monotonic() < deadline, "the engine still holds requests"
        time.sleep(0.01)


def _sse_events(lines) -> list:
    """``data:`` payloads of an SSE stream (JSON objects, and the final '[DONE]')."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---------------------------------------------------------------------------- the OpenAI client
def test_completions_streamed_and_not_match_offline_generate(client, references):
    ref = references["seeded"]
    out = client.completions.create(model=MODEL, prompt=SNIPPETS[0], **SEEDED)
    (choice,) = out.choices
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    spec = choice.model_extra["specdec"]
    assert spec["acceptance_rate"] == pytest.approx(ref.metrics.acceptance_rate)
    assert spec["mean_accepted_length"] == pytest.approx(ref.metrics.mean_accepted_length)
    assert spec["mean_accepted_length"] >= 1.0

    chunks = list(client.completions.create(model=MODEL, prompt=SNIPPETS[0], stream=True,
                                            stream_options={"include_usage": True}, **SEEDED))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finals] == [ref.finish_reason]
    assert finals[0].model_extra["specdec"]["mean_accepted_length"] == pytest.approx(spec["mean_accepted_length"])
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_a_list_of_prompts_with_n_gives_separate_sequences(client, references):
    out = client.completions.create(model=MODEL, prompt=[SNIPPETS[1], SNIPPETS[2]], n=2, **SEEDED)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == references["n2"]  # choice j of a prompt: seed + j


def test_chat_completions_need_a_chat_template(client, llm, references):
    with pytest.raises(openai.BadRequestError) as info:  # the demo tokenizer has none
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert info.value.status_code == 400 and info.value.code == "chat_template_missing"
    assert "chat template" in info.value.message
    ref = references["chat"]
    llm.tokenizer.chat_template = TEMPLATE
    try:
        out = client.chat.completions.create(model=MODEL, messages=CHAT, **SEEDED)
        streamed = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **SEEDED))
    finally:
        llm.tokenizer.chat_template = None
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ref.text
    assert streamed[-1].choices[0].finish_reason == ref.finish_reason


def test_the_load_benchmark_drives_the_server(server):
    seconds, samples = asyncio.run(drive(server.url, concurrency=2, requests_per_client=1, max_tokens=3,
                                         api_key=KEY))
    assert seconds > 0 and [s.tokens for s in samples] == [3, 3]
    assert all(s.ttft > 0 and s.itl >= 0 for s in samples)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------- many clients
def test_64_concurrent_streaming_clients_share_the_batch(server, llm, references):
    before = _metric(server, "specdec_step_batch_size")

    async def one(aclient, i):
        stream = await aclient.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True}, **_client_request(i))
        text, usage, reasons = "", None, []
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
            usage = chunk.usage or usage
        return text, usage.completion_tokens, reasons

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(N_CLIENTS)))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    assert [r[0] for r in results] == references["clients"]  # nothing lost, nothing duplicated
    assert [r[1] for r in results] == [CLIENT_TOKENS] * N_CLIENTS
    assert all(r[2] == ["length"] for r in results)
    after = _metric(server, "specdec_step_batch_size")
    steps = after["_count"] - before["_count"]
    single = after[1.0] - before[1.0]
    assert steps - single > 0  # some steps held more than one request
    assert _idle(server, llm)


def test_a_client_that_disconnects_is_cancelled_and_its_blocks_freed(server, llm):
    http = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
    body = {"model": MODEL, "prompt": SNIPPETS[3], "max_tokens": 600, "ignore_eos": True, "stream": True,
            "seed": 5}
    others = [{"model": MODEL, "prompt": s, "max_tokens": 20, "ignore_eos": True, "seed": 7, "stream": True}
              for s in SNIPPETS[:2]]
    with http.stream("POST", "/v1/completions", json=others[0]) as first, \
            http.stream("POST", "/v1/completions", json=others[1]) as second:
        with http.stream("POST", "/v1/completions", json=body) as leaving:
            lines = leaving.iter_lines()
            event = _next_event(lines)
            handle = server.state.handles[event["id"]]
            (choice,) = handle.choices
            request = choice.request
            assert _on_worker(server, lambda: llm.blocks.capacity(request.id)) > 0
            steps_at_close = _on_worker(server, lambda: server.state.engine.steps)
        # the response is closed: the server sees the disconnect and cancels the request
        deadline = time.monotonic() + 30
        while True:
            done, steps, held = _on_worker(server, lambda: (request.finished, server.state.engine.steps,
                                                            llm.blocks.capacity(request.id)))
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        assert done and request.finish_reason == "abort"
        assert held == 0 and steps - steps_at_close <= 2
        assert len(request.token_ids) < 600
        for response in (first, second):
            events = _sse_events(response.iter_lines())
            assert events[-1] == "[DONE]"
            assert events[-2]["choices"][0]["finish_reason"] == "length"
    http.close()
    assert _idle(server, llm)


def test_a_non_streaming_client_that_leaves_is_cancelled_too(server, llm):
    body = {"model": MODEL, "prompt": SNIPPETS[0], "max_tokens": 900, "ignore_eos": True}
    before = _metric(server, "specdec_requests")[(("status", "abort"),)]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=0.5))
    _wait_idle(server, llm)
    assert _metric(server, "specdec_requests")[(("status", "abort"),)] == before + 1


def test_an_engine_failure_outside_any_request_ends_the_requests_not_the_server(llm):
    with ServerThread(llm, MODEL) as server:
        step = llm.step
        llm.step = lambda: (_ for _ in ()).throw(RuntimeError("injected"))
        try:
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30)
        finally:
            llm.step = step
        assert r.status_code == 500
        _assert_error_shape(r.json(), None, "generation_error")
        assert "injected" in r.json()["error"]["message"] and "Traceback" not in r.text
        assert not llm.has_work()
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "ignore_eos": True},
                        timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_max_waiting_answers_503_with_retry_after(small):
    long = {"prompt": SNIPPETS[0], "max_tokens": 150, "ignore_eos": True, "stream": True}
    with ServerThread(small, MODEL, max_waiting=1) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # it runs (max_num_seqs=1: the next one waits)
            with http.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # admitted, waiting for the batch
                refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert refused.status_code == 503
                assert int(refused.headers["Retry-After"]) >= 1
                _assert_error_shape(refused.json(), None, "overloaded")
        _wait_idle(server, small)  # both clients left: their requests are cancelled
        ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


def test_sigterm_finishes_or_aborts_in_flight_requests_and_exits(llm):
    server = ServerThread(llm, MODEL, shutdown_timeout=1.0).start()
    http = httpx.Client(base_url=server.url, timeout=60)
    short = {"prompt": SNIPPETS[1], "max_tokens": 6, "ignore_eos": True, "stream": True}
    long = {"prompt": SNIPPETS[2], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=short) as a, http.stream("POST", "/v1/completions",
                                                                              json=long) as b:
        lines_a, lines_b = a.iter_lines(), b.iter_lines()
        next(lines_a), next(lines_b)  # both in flight
        server.terminate()
        for _ in range(1000):
            if server.state.draining:
                break
            time.sleep(0.005)
        try:
            late = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
            assert late.status_code == 503
            _assert_error_shape(late.json(), None, "shutting_down")
        except httpx.TransportError:
            pass  # the listening socket is already closed: also a refusal
        events_a, events_b = _sse_events(lines_a), _sse_events(lines_b)
    assert events_a[-1] == events_b[-1] == "[DONE]"
    assert events_a[-2]["choices"][0]["finish_reason"] == "length"  # finished within the grace period
    assert events_b[-2]["choices"][0]["finish_reason"] == "abort"  # aborted after it
    http.close()
    assert server.join(30)
    assert not llm.has_work() and llm.blocks.num_free_blocks == llm.blocks.num_blocks


# ---------------------------------------------------------------------------- bad requests
def _assert_error_shape(body: dict, param, code) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code


COMPLETION = {"model": MODEL, "prompt": "def f(x):\n", "max_tokens": 4}
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [
    # (name, path, body (dict, or raw bytes), headers, status, param, code)
    ("max_tokens as a string", "/v1/completions", {**COMPLETION, "max_tokens": "4"}, AUTH, 400, "max_tokens", None),
    ("max_tokens 0", "/v1/completions", {**COMPLETION, "max_tokens": 0}, AUTH, 400, "max_tokens", None),
    ("max_tokens float", "/v1/completions", {**COMPLETION, "max_tokens": 2.5}, AUTH, 400, "max_tokens", None),
    ("negative temperature", "/v1/completions", {**COMPLETION, "temperature": -1}, AUTH, 400, "temperature", None),
    ("huge temperature", "/v1/completions", {**COMPLETION, "temperature": 1e4}, AUTH, 400, "temperature", None),
    ("top_p above 1", "/v1/completions", {**COMPLETION, "top_p": 1.5}, AUTH, 400, "top_p", None),
    ("top_k float", "/v1/completions", {**COMPLETION, "top_k": 1.5}, AUTH, 400, "top_k", None),
    ("n 0", "/v1/completions", {**COMPLETION, "n": 0}, AUTH, 400, "n", None),
    ("negative seed", "/v1/completions", {**COMPLETION, "seed": -1}, AUTH, 400, "seed", None),
    ("stop as a number", "/v1/completions", {**COMPLETION, "stop": 5}, AUTH, 400, "stop", None),
    ("five stop strings", "/v1/completions", {**COMPLETION, "stop": list("abcde")}, AUTH, 400, "stop", None),
    ("stream as a string", "/v1/completions", {**COMPLETION, "stream": "yes"}, AUTH, 400, "stream", None),
    ("unknown field", "/v1/completions", {**COMPLETION, "foo": 1}, AUTH, 400, "foo", "unknown_parameter"),
    ("logprobs", "/v1/completions", {**COMPLETION, "logprobs": 2}, AUTH, 400, "logprobs", "unsupported_parameter"),
    ("logprobs 0 (one log-probability)", "/v1/completions", {**COMPLETION, "logprobs": 0}, AUTH, 400, "logprobs",
     "unsupported_parameter"),
    ("presence penalty", "/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, AUTH, 400,
     "presence_penalty", "unsupported_parameter"),
    ("empty prompt", "/v1/completions", {**COMPLETION, "prompt": ""}, AUTH, 400, "prompt", None),
    ("no prompt", "/v1/completions", {"model": MODEL}, AUTH, 400, "prompt", None),
    ("token id outside the vocabulary", "/v1/completions", {**COMPLETION, "prompt": [5, 99999]}, AUTH, 400,
     "prompt", None),
    ("prompt over the context", "/v1/completions", {**COMPLETION, "prompt": [5] * 1030}, AUTH, 400, "prompt",
     "context_length_exceeded"),
    ("prompt + max_tokens over the context", "/v1/completions", {**COMPLETION, "prompt": [5] * 1000,
     "max_tokens": 100}, AUTH, 400, "max_tokens", "context_length_exceeded"),
    ("empty messages", "/v1/chat/completions", {**CHAT_BODY, "messages": []}, AUTH, 400, "messages", None),
    ("no messages", "/v1/chat/completions", {"model": MODEL}, AUTH, 400, "messages", None),
    ("unknown role", "/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "robot", "content": "hi"}]},
     AUTH, 400, "messages[0].role", None),
    ("content as a number", "/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "user", "content": 5}]},
     AUTH, 400, "messages[0].content", None),
    ("prompt in a chat request", "/v1/chat/completions", {**CHAT_BODY, "prompt": "x"}, AUTH, 400, "prompt",
     "unknown_parameter"),
    ("tools", "/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function"}]}, AUTH, 400, "tools",
     "unsupported_parameter"),
    ("not JSON", "/v1/completions", b"{not json", AUTH, 400, None, "invalid_json"),
    ("a JSON list", "/v1/completions", [1, 2], AUTH, 400, None, None),
    ("oversized body", "/v1/completions", {**COMPLETION, "prompt": "x" * (BODY_LIMIT + 1)}, AUTH, 413, None,
     "request_too_large"),
    ("wrong API key", "/v1/completions", COMPLETION, {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key"),
    ("no API key", "/v1/completions", COMPLETION, {}, 401, None, "invalid_api_key"),
    ("unknown model", "/v1/completions", {**COMPLETION, "model": "gpt-9"}, AUTH, 404, "model", "model_not_found"),
    ("unknown route", "/v1/embeddings", COMPLETION, AUTH, 404, None, "unknown_url"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_the_documented_error(server, name, path, body, headers, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    _assert_error_shape(r.json(), param, code)


def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=None, echo=False,
                                    presence_penalty=0, frequency_penalty=0.0, logit_bias={}, best_of=1)
    assert len(out.choices) == 1


def test_bad_requests_do_not_disturb_requests_in_flight(server, llm, client):
    http = httpx.Client(base_url=server.url, timeout=60)
    body = {"model": MODEL, "prompt": SNIPPETS[0], "max_tokens": 30, "ignore_eos": True, "stream": True, "seed": 9}
    with http.stream("POST", "/v1/completions", json=body, headers=AUTH) as stream:
        lines = stream.iter_lines()
        first = _next_event(lines)
        for _, path, bad, headers, status, _, _ in BAD[::3]:
            content = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
            assert http.post(path, content=content, headers=headers).status_code == status
        events = _sse_events(lines)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in [first] + events[:-1])
    solo = client.completions.create(model=MODEL, prompt=SNIPPETS[0], max_tokens=30, seed=9,
                                     extra_body={"ignore_eos": True})
    assert solo.choices[0].text == text  # the same seeded request alone: the same text
    http.close()


def test_a_request_that_can_never_fit_the_kv_cache_is_refused(small):
    assert small.blocks.num_blocks * small.blocks.block_size < 200
    with ServerThread(small, MODEL) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": SNIPPETS[0], "max_tokens": 200})
        assert r.status_code == 400
        _assert_error_shape(r.json(), "max_tokens", "kv_cache_exceeded")
        assert "KV blocks" in r.json()["error"]["message"]
        assert not small.has_work()
        assert httpx.post(server.url + "/v1/completions", json={"prompt": SNIPPETS[0], "max_tokens": 8}
                          ).status_code == 200


# ---------------------------------------------------------------------------- metrics
def _metric(server, name: str) -> dict:
    """One metric family from /metrics: {labels-or-bucket: value}."""
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                out[float(s.labels["le"])] = s.value
            elif s.name.endswith("_count"):
                out["_count"] = s.value
            elif s.name.endswith("_sum"):
                out["_sum"] = s.value
            elif s.name.endswith("_created"):
                continue
            else:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_parse_and_count_what_was_sent(llm):
    with ServerThread(llm, MODEL) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        a = http.post("/v1/completions", json={"prompt": SNIPPETS[0], "max_tokens": 5, "ignore_eos": True}).json()
        b = _sse_events(http.post("/v1/completions", json={"prompt": [SNIPPETS[1], SNIPPETS[2]], "n": 2,
                                                            "max_tokens": 4, "ignore_eos": True, "stream": True,
                                                            "stream_options": {"include_usage": True}}
                                  ).iter_lines())
        assert http.post("/v1/completions", json={"prompt": "x", "top_p": 2}).status_code == 400
        assert http.get("/nowhere").status_code == 404
        http.close()
        usage_b = b[-2]["usage"]
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
        requests = _metric(server, "specdec_requests")
        responses = _metric(server, "specdec_http_responses")
        assert requests[(("status", "length"),)] == 5 and requests[(("status", "abort"),)] == 0
        assert responses[(("code", "200"), ("endpoint", "completions"))] == 2
        assert responses[(("code", "400"), ("endpoint", "completions"))] == 1
        assert responses[(("code", "404"), ("endpoint", "other"))] == 1
        assert _metric(server, "specdec_prompt_tokens")[()] == a["usage"]["prompt_tokens"] + usage_b["prompt_tokens"]
        assert _metric(server, "specdec_generation_tokens")[()] == 5 + 16 == \
            a["usage"]["completion_tokens"] + usage_b["completion_tokens"]
        ttft = _metric(server, "specdec_time_to_first_token_seconds")
        assert ttft["_count"] == 5
        steps = _metric(server, "specdec_step_duration_seconds")["_count"]
        assert steps == _metric(server, "specdec_engine_steps")[()] > 0
        assert _metric(server, "specdec_num_requests_running")[()] == 0
        assert _metric(server, "specdec_num_requests_waiting")[()] == 0
        assert _metric(server, "specdec_kv_cache_usage_ratio")[()] == 0
        by_position = _metric(server, "specdec_acceptance_rate_by_position")
        assert sorted(by_position) == [(("position", str(i)),) for i in range(3)]  # k = 3
        assert all(0 <= v <= 1 for v in by_position.values())
        assert _metric(server, "specdec_mean_accepted_length")[()] >= 1
        assert _metric(server, "specdec_accepted_length_per_draft_step")[()] >= 1  # the requests drafted
        assert families["specdec_step_batch_size"].type == "histogram"


# ---------------------------------------------------------------------------- the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_specdec_serve_command_serves_and_exits_cleanly_on_sigterm():
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "specdec", "serve", "--port", str(port), "--backend", "torch",
                             "--device", "cpu", "--log-level", "warning", "--shutdown-timeout", "5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "specdec serve did not come up"
            time.sleep(0.1)
        out = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "import os\n", "max_tokens": 3},
                         timeout=30).json()
        assert out["model"] == MODEL and out["usage"]["completion_tokens"] <= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
