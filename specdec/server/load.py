"""Load benchmark of the server: many streaming clients over loopback.

For each decoding mode (speculative with the drafter, plain without it) a server is
started in this process on 127.0.0.1 and a free port, warmed up, and driven at each
concurrency by that many asyncio clients, each sending ``requests_per_client`` streaming
completions back to back (seeded sampling, ``ignore_eos`` so every request generates
``max_tokens``). Per request it records:

    TTFT  time from sending the request to its first text chunk
    ITL   (time of the last chunk - time of the first) / (tokens - 1): the mean gap
          between output tokens after the first (with speculation a chunk may carry
          several tokens, so gaps between chunks would not compare)

and per concurrency: requests/s and output tokens/s over the wall time of the level,
p50 / p99 of TTFT and ITL over its requests, and the server's mean accepted length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import httpx

PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "    def __repr__(self):\n        return",
)


@dataclass
class Sample:
    ttft: float
    itl: float | None
    tokens: int


@dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    samples: list[Sample]
    mean_accepted_length: float

    @property
    def output_tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def row(self) -> str:
        ttft = [s.ttft for s in self.samples]
        itl = [s.itl for s in self.samples if s.itl is not None] or [0.0]
        return (f"| {self.mode} | {self.concurrency} | {self.requests} | {self.requests / self.seconds:.2f} | "
                f"{self.output_tokens / self.seconds:.1f} | {_ms(_pct(ttft, 50))} | {_ms(_pct(ttft, 99))} | "
                f"{_ms(_pct(itl, 50))} | {_ms(_pct(itl, 99))} | {self.mean_accepted_length:.2f} |")


HEADER = ("| decoding | concurrency | requests | requests/s | output tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | "
          "ITL p50 (ms) | ITL p99 (ms) | mean accepted length |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


async def _one(http: httpx.AsyncClient, body: dict) -> Sample:
    start = time.perf_counter()
    first: float | None = None  # when the first text arrived
    last = start
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    if first is None:
        raise RuntimeError("a request streamed no text")
    return Sample(first - start, (last - first) / (tokens - 1) if tokens > 1 else None, tokens)


async def drive(url: str, concurrency: int, requests_per_client: int, max_tokens: int, api_key: str | None = None,
                seed: int = 0) -> tuple[float, list[Sample]]:
    """``concurrency`` clients, each sending ``requests_per_client`` streaming requests one
    after another; returns (wall seconds, samples)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as http:
        async def client(c: int) -> list[Sample]:
            out = []
            for r in range(requests_per_client):
                i = c * requests_per_client + r
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 1.0,
                        "seed": seed + i, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                out.append(await _one(http, body))
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(concurrency)))
        return time.perf_counter() - start, [s for r in results for s in r]


def _mean_accepted_length(url: str, api_key: str | None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "specdec_mean_accepted_length":
            return family.samples[0].value
    return float("nan")


def run_levels(url: str, mode: str, levels: list[int], requests_per_client: int, max_tokens: int,
               api_key: str | None = None) -> list[Level]:
    asyncio.run(drive(url, 1, 1, max_tokens, api_key))  # warm-up
    out = []
    for c in levels:
        seconds, samples = asyncio.run(drive(url, c, requests_per_client, max_tokens, api_key))
        out.append(Level(mode, c, len(samples), seconds, samples, _mean_accepted_length(url, api_key)))
        print(out[-1].row(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="target model directory (default: the embedded demo target)")
    parser.add_argument("--draft", default=None, help="drafter for the speculative rows (default with the demo: "
                        "its EAGLE-3 head)")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--modes", default="speculative,plain")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in levels) or args.requests_per_client < 1 or args.max_tokens < 2:
        parser.error("concurrency and --requests-per-client must be >= 1, --max-tokens >= 2")

    import torch

    from .. import LLM
    from ..demo import best_draft, demo_dirs
    from . import ServerThread

    if args.target is None:
        dirs = demo_dirs()
        target, draft = dirs.target, args.draft or best_draft(dirs)
    else:
        target, draft = args.target, args.draft
    modes = args.modes.split(",")
    if "speculative" in modes and draft is None:
        parser.error("the speculative rows need --draft")
    print(f"target {target}, draft {draft}, k={args.num_draft_tokens}, max_tokens {args.max_tokens}, "
          f"{args.requests_per_client} requests per client, torch threads {torch.get_num_threads()}\n")
    print(HEADER, flush=True)
    for mode in modes:
        llm = LLM(target, draft=draft if mode == "speculative" else None, num_draft_tokens=args.num_draft_tokens,
                  device=args.device, backend=args.backend, max_num_seqs=max(levels))
        llm.warm_up()  # CUDA graphs (if any) captured before the clock starts
        with ServerThread(llm, mode) as server:
            run_levels(server.url, mode, levels, args.requests_per_client, args.max_tokens)
        del llm
    return 0
