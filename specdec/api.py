"""``LLM``: load a target and a drafter, then generate for many prompts at once."""

from __future__ import annotations

import copy
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, cast

import torch
from tqdm.auto import tqdm

from .config import EngineConfig
from .cuda_graphs import DecodeRunner
from .drafters.factory import build_drafter, draft_cache_config
from .engine import Engine
from .kernels import get_backend
from .kv_cache import allocate_caches
from .models import GenerationDefaults, load_model
from .models.loader import load_tokenizer
from .request import (
    Request,
    conversation_list,
    encode_prompt,
    is_prompt,
    pair_prompts,
    render_conversation,
    run_to_completion,
    stream_text,
)
from .sampling_params import SamplingParams
from .sequence import RequestMetrics, RequestOutput, Sequence, Status
from .speculation import AdaptiveSpeculation


def generation_files(path: str | Path, config) -> tuple[GenerationDefaults, tuple[int, ...]]:
    """The model directory's generation_config.json (default sampling values), and the EOS
    ids of both files: chat models list their turn-end tokens there, and a token either
    file names ends generation."""
    defaults = GenerationDefaults.from_dir(path)
    return defaults, tuple(dict.fromkeys(config.eos_token_ids + (defaults.eos_token_ids or ())))


class Load(NamedTuple):
    """``LLM.load()``: a snapshot of what an instance holds."""

    running: int  # requests admitted into the running batch
    waiting: int  # requests queued for admission (new or preempted)
    kv_cache_usage: float  # fraction of KV-cache blocks in use


class LLM:
    """A target model, an optional drafter, a paged KV cache and the step loop.

    target:           HF-style model directory (config.json + safetensors)
    draft:            None (plain decoding), a draft model directory sharing the target's
                      vocabulary, an EAGLE-3 head directory (drafts from the target's own
                      hidden states), ``"ngram"`` (prompt lookup) or ``"early-exit:N"`` (the
                      target's first N layers)
    num_draft_tokens: draft tokens proposed per step (the chain length k); with adaptive
                      speculation, the most a step proposes
    device:           defaults to CUDA when present, else CPU
    dtype:            defaults to bfloat16 on CUDA, float32 on CPU
    backend:          "torch" (reference kernels), "triton", or "auto" (triton on CUDA)
    kv_cache_memory:  bytes for the KV cache (target + draft model); default: 70% of free
                      GPU memory on CUDA, up to 1 GiB on CPU, never more than
                      ``max_num_seqs`` full-context sequences need
    block_size:       tokens per KV block
    max_num_seqs:     sequences decoded together (continuous batching admits more as
                      others finish)
    seed:             seeds the per-request seeds of requests that give none
    draft_tree:       a static draft tree instead of a chain: every node at depth d gets
                      ``draft_tree[d]`` children, e.g. (3, 2, 1, 1); at most 63 nodes.
                      With an EAGLE-3 head also ``"dynamic:K,D,N"``: an EAGLE-2 dynamic
                      tree (top-K expansion, depth D, N tokens verified with the root)
    adaptive:         choose each step's chain length (0 .. num_draft_tokens) from the
                      measured acceptance and the measured cost of drafting and verifying
                      at the current batch size, so large batches fall back to plain
                      decoding. Default: on with CUDA graphs (where costs are timed on the
                      captured steps), off otherwise. Outputs keep the target's
                      distribution either way, but k then depends on timings, so a seeded
                      request repeats token for token only with ``adaptive=False``.
    cuda_graphs:      replay decode steps as CUDA graphs captured per batch-size bucket,
                      chain length and sampling mode (prefill, trees and n-gram drafts run
                      eagerly). Default: on with CUDA and the Triton backend

    The target's ``generation_config.json``, when it has one, adds its EOS ids (an int
    or a list) to config.json's (``eos_token_ids``: either file's ids end generation)
    and gives the default temperature, top_k and top_p
    of requests that leave them unset (see ``SamplingParams``; ``generation_defaults``).

    >>> llm = LLM("out/stories260K", draft="early-exit:4")           # doctest: +SKIP
    >>> out = llm.generate("Once upon a time", SamplingParams(max_tokens=32, temperature=0))
    >>> print(out[0].text, out[0].metrics.mean_accepted_length)
    """

    def __init__(self, target: str | Path, draft: str | Path | None = None, num_draft_tokens: int = 4,
                 device=None, dtype: torch.dtype | None = None, backend: str = "auto", *,
                 kv_cache_memory: int | None = None, block_size: int = 16, max_num_seqs: int = 64,
                 seed: int | None = None, draft_tree: tuple[int, ...] | str | None = None,
                 adaptive: bool | None = None, cuda_graphs: bool | None = None):
        cfg = self.engine_config = EngineConfig(
            target, draft, num_draft_tokens, device, dtype, backend, kv_cache_memory=kv_cache_memory,
            block_size=block_size, max_num_seqs=max_num_seqs, seed=seed, draft_tree=draft_tree,
            adaptive=adaptive, cuda_graphs=cuda_graphs)  # every option checked before anything loads
        # EngineConfig.__post_init__ resolved both to a torch.device and a torch.dtype
        self.device, self.dtype = cast(torch.device, cfg.device), cast(torch.dtype, cfg.dtype)
        self.backend = cfg.backend
        # the target, its generation defaults and tokenizer
        self.target = load_model(target, self.device, self.dtype)
        self.config = self.target.config
        self.generation_defaults, self.eos_token_ids = generation_files(target, self.config)
        self.tokenizer = load_tokenizer(target)
        self.ops = get_backend(cfg.backend)
        # the paged KV caches: the target's, and the drafter's own when it has one
        spec = cfg.drafter
        draft_config = draft_cache_config(spec, target, self.config)
        self.blocks, caches = allocate_caches([self.config] + ([draft_config] if draft_config else []),
                                              cfg.kv_cache_memory, cfg.block_size, cfg.max_num_seqs,
                                              cfg.draft_slots, self.dtype, self.device)
        self.cache, draft_cache = caches[0], caches[1] if draft_config else None
        # the drafter, then the engine with its fixed-shape runner (if any)
        self.drafter = build_drafter(spec, self.target, self.cache, draft_cache, self.blocks, self.ops,
                                     self.device, self.dtype, draft_config)
        self.engine = Engine(self.target, self.cache, self.blocks, self.ops, self.drafter, cfg.draft_slots,
                             eos_token_ids=self.eos_token_ids, max_num_seqs=cfg.max_num_seqs,
                             tokenizer=self.tokenizer, draft_depth=spec.draft_depth,
                             speculation=AdaptiveSpeculation(cfg.draft_slots) if cfg.adaptive else None,
                             runner=self.decode_runner(use_graphs=True) if cfg.cuda_graphs else None)
        self._rng = random.Random(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little"))
        self._next_id = 0

    # ------------------------------------------------------------------ set-up helpers
    def decode_runner(self, use_graphs: bool) -> DecodeRunner:
        """The fixed-shape decode step of this model and drafter (CUDA graphs when
        ``use_graphs``; eagerly otherwise, which is how the CPU tests exercise it)."""
        cfg = self.engine_config
        return DecodeRunner(self.target, self.cache, self.ops, self.drafter, max_k=cfg.draft_slots,
                            max_batch=cfg.max_num_seqs, max_context=self.config.max_position_embeddings,
                            block_size=self.blocks.block_size, use_graphs=use_graphs)

    def warm_up(self, batch_sizes: list[int] | None = None, modes: tuple[str, ...] = ("greedy", "sample")) -> int:
        """Compile every Triton kernel variant a step can launch (graph and eager paths),
        capture the CUDA graphs of decode steps and time them for adaptive speculation,
        ahead of serving, so that the first requests do not pay for it.

        batch_sizes: the batch sizes to prepare (rounded up to their graph buckets);
                     default every bucket up to ``max_num_seqs``
        modes:       sampling modes to prepare: "greedy" (temperature 0 everywhere),
                     "sample" (no top-k / top-p), "filtered"
        returns:     the number of (bucket, mode, k) steps prepared; 0 without CUDA graphs
                     (steps are then captured, if at all, on first use)
        """
        return self.engine.warm_up(_warm_up_batch_sizes(batch_sizes, self.engine.max_num_seqs), tuple(modes))

    # ------------------------------------------------------------------ requests
    def _make_sequences(self, prompts, params) -> list[Sequence]:
        """Validate every prompt and parameter set before any work starts."""
        seqs = []
        for i, (prompt, p) in enumerate(pair_prompts(prompts, params)):
            p = p.with_defaults(**self.generation_defaults.sampling())  # unset values: the model's
            ids, text = encode_prompt(i, prompt, p, self.tokenizer, self.config.vocab_size,
                                      self.config.max_position_embeddings)
            seed = p.seed if p.seed is not None else self._rng.getrandbits(63)
            seq = Sequence(self._next_id + i, ids, p, seed, prompt=text)
            self.engine.check_fits(seq)
            seqs.append(seq)
        self._next_id += len(seqs)
        return seqs

    def _register(self, seq: Sequence) -> Request:
        """Hand ``seq`` to the engine (max_tokens=0 finishes at once); returns its handle."""
        request = Request(seq, self.engine, self.tokenizer)
        if seq.params.max_tokens == 0:
            seq.finish_reason, seq.status = "length", Status.FINISHED
        else:
            self.engine.add(seq)
        return request

    def submit(self, prompt, params: SamplingParams | None = None) -> Request:
        """Queue one request and return its handle; it advances whenever anyone steps the
        engine (``step()``, ``generate()``, a ``stream()``). Validated before it is queued.

        >>> req = llm.submit("Once upon a time", SamplingParams(max_tokens=8))  # doctest: +SKIP
        >>> while not req.finished:
        ...     llm.step()
        >>> req.output().text
        """
        if not is_prompt(prompt):
            raise TypeError("submit() takes one prompt: a str or a list of token ids")
        (seq,) = self._make_sequences([prompt], params)
        return self._register(seq)

    def step(self) -> list[int]:
        """One engine step over every queued request, whoever submitted it; returns the ids
        of the requests that finished in it (a failed one with reason 'error')."""
        return [s.seq_id for s in self.engine.step()]

    def has_work(self) -> bool:
        """Whether any request is queued or running."""
        return self.engine.has_work()

    def load(self) -> Load:
        """What this instance holds now: requests running, requests waiting, KV-cache use."""
        return Load(running=len(self.engine.running), waiting=len(self.engine.waiting),
                    kv_cache_usage=1.0 - self.blocks.num_free_blocks / self.blocks.num_blocks)

    def _step_until_progress(self, request: Request) -> None:
        """Step the engine for an unfinished ``request`` (it is queued, so there is work)."""
        if not self.engine.has_work():
            raise RuntimeError(f"request {request.id} is unfinished but not in the engine")
        self.engine.step()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        prompts:  a str, a list of str, or a list of token-id lists
        params:   one SamplingParams for all, or one per prompt (default SamplingParams())
        progress: show a progress bar over finished requests; default: only when stderr
                  is a terminal and there is more than one prompt

        Every prompt and parameter set is checked before any work starts: one bad prompt
        raises and nothing is generated. If one of the requests fails at run time (see
        ``RequestOutput.error``), its exception is raised and the call's other requests
        are cancelled; so are all of them when the call is interrupted. Other callers'
        requests on this instance are not affected either way.

        >>> outs = llm.generate(["def add(a, b):", "import os"],            # doctest: +SKIP
        ...                     SamplingParams(max_tokens=16, temperature=0))
        >>> [o.finish_reason for o in outs]
        ['length', 'length']
        """
        seqs = self._make_sequences(prompts, params)
        if progress is None:
            progress = len(seqs) > 1 and sys.stderr.isatty()
        bar = tqdm(total=len(seqs), desc="generate", unit="req", disable=not progress)
        requests = []
        try:
            requests = [self._register(seq) for seq in seqs]
            run_to_completion(requests, self._step_until_progress, bar.update)
        finally:
            bar.close()
            for r in requests:
                r.cancel()  # a no-op for the finished; frees the rest after an error or interrupt
        return [r.output() for r in requests]

    def render_chat(self, conversation: list[dict], chat_template: str | None = None) -> list[int]:
        """One conversation rendered with the tokenizer's chat template, ending with the
        assistant turn's opening (``add_generation_prompt=True``): the prompt's token ids.

        conversation:  a list of ``{"role": ..., "content": ...}`` messages
        chat_template: a Jinja template to use instead of the tokenizer's own
        """
        return render_conversation(self.tokenizer, conversation, chat_template)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None,
             progress: bool | None = None, *, chat_template: str | None = None) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to each of several.

        messages:      one conversation (a list of ``{"role": ..., "content": ...}`` dicts)
                       or a list of conversations
        params:        as for ``generate`` (one for all, or one per conversation)
        chat_template: a Jinja template to use instead of the tokenizer's own
        returns:       one RequestOutput per conversation, in order

        Each conversation is rendered with the tokenizer's chat template and the assistant
        turn opened (``apply_chat_template(..., add_generation_prompt=True)``), then
        generated as ``generate`` does; a model whose tokenizer has no chat template
        raises ``ValueError`` before any work.

        >>> out = llm.chat([{"role": "user", "content": "Hi!"}])          # doctest: +SKIP
        >>> out[0].text
        """
        prompts = [self.render_chat(c, chat_template) for c in conversation_list(messages)]
        return self.generate(prompts, params, progress)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the generated text of one prompt in increments, as tokens are accepted.

        A character split across tokens is held back until it is complete, and text that
        could be the start of a stop string is held back until it is known not to be.
        The prompt and parameters are checked here, before anything is queued; the
        request is queued when iteration starts. Other callers may step the engine in
        between: the stream still yields exactly its own full text. Leaving the loop
        early (``break``, an exception, ``close()``) cancels the request and frees its
        blocks; a request that fails raises its error from the iterator.

        >>> for piece in llm.stream("Once upon a time", SamplingParams(max_tokens=32)):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        if self.tokenizer is None:
            raise ValueError("stream() yields text and this model directory has no tokenizer; use generate()")
        if not is_prompt(prompt):
            raise TypeError("stream() takes one prompt: a str or a list of token ids")
        (seq,) = self._make_sequences([prompt], params)
        return stream_text(lambda: self._register(seq), self._step_until_progress)

    def metrics(self) -> dict:
        """Totals over every request this instance served."""
        return engine_metrics(self.engine, num_requests=self._next_id)

    def totals(self) -> RequestMetrics:
        """A snapshot of the speculation counters over every retired request (``metrics()``'s
        counts); ``later.since(earlier)`` gives what one stretch of work added."""
        return copy.deepcopy(self.engine.totals)


def _warm_up_batch_sizes(batch_sizes: list[int] | None, max_num_seqs: int) -> list[int]:
    """``LLM.warm_up``'s batch sizes: every size up to ``max_num_seqs`` by default; ValueError unless positive ints."""
    if batch_sizes is None:
        batch_sizes = list(range(1, max_num_seqs + 1))
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    return batch_sizes


def engine_metrics(engine: Engine, num_requests: int) -> dict:
    """``LLM.metrics()``: the engine's totals over its retired requests, and its latest state."""
    t = engine.totals
    return {
        "num_requests": num_requests,
        **t.as_dict(),
        # generated tokens per second of engine time (steps), not the callers' time between them
        "tokens_per_second": t.num_generated / engine.busy_seconds if engine.busy_seconds else 0.0,
        "chain_length": engine.last_k,  # the latest step's k (adaptive speculation varies it)
        "measured_alpha": engine.speculation.alpha if engine.speculation is not None else None,
    }
