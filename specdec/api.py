"""``LLM``: load a target and a drafter, then generate for many prompts at once."""

from __future__ import annotations

import numbers
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cuda_graphs import DecodeRunner
from .drafters.base import Drafter
from .drafters.draft_model import ModelDrafter
from .drafters.eagle3 import DynamicTree, Eagle3Drafter  # eagle3
from .drafters.eagle3_head import Eagle3Head  # eagle3
from .drafters.ngram import NgramDrafter
from .engine import Engine
from .kernels import BACKENDS, get_backend
from .kv_cache import BlockManager, KVCache, cdiv
from .models import GenerationDefaults, load_model
from .models.eagle3 import check_against_target, is_eagle3_dir, load_eagle3  # eagle3
from .sampling_params import SamplingParams
from .request import Request
from .sequence import RequestOutput, Sequence, Status
from .speculation import AdaptiveSpeculation
from .tree import TreeShape

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DRAFTER_NAMES = ("a model directory", "'ngram'", "'early-exit:N'")
NGRAM = "ngram"
EARLY_EXIT = "early-exit:"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: str | Path):
    """transformers' AutoTokenizer for a model directory, or None when it has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class LLM:
    """A target model, an optional drafter, a paged KV cache and the step loop.

    target:           HF-style model directory (config.json + safetensors)
    draft:            None (plain decoding), a draft model directory sharing the target's
                      vocabulary, ``"ngram"`` (prompt lookup) or ``"early-exit:N"`` (the
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
                 seed: int | None = None, draft_tree: tuple[int, ...] | None = None,
                 adaptive: bool | None = None, cuda_graphs: bool | None = None):
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        if block_size < 1 or max_num_seqs < 1:
            raise ValueError(f"block_size and max_num_seqs must be >= 1, got {block_size}, {max_num_seqs}")
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(self.device)!r} was asked for but this torch build or machine has no "
                             "CUDA device: pass device='cpu'")
        if kv_cache_memory is not None and (not isinstance(kv_cache_memory, numbers.Real) or
                                            isinstance(kv_cache_memory, bool) or not kv_cache_memory > 0):
            raise ValueError(f"kv_cache_memory must be a number of bytes > 0 (or None for the default), "
                             f"got {kv_cache_memory!r}")
        if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.backend = backend
        draft_kind = self._draft_kind(draft)  # validate the name before loading anything
        # -- eagle3 (begin): an EAGLE-3 head directory; draft_tree="dynamic:K,D,N" --
        eagle3 = draft_kind == "model" and is_eagle3_dir(draft)
        dynamic = DynamicTree.parse(draft_tree) if isinstance(draft_tree, str) else None
        if dynamic is not None and not eagle3:
            raise ValueError(f"draft_tree={draft_tree!r} (a dynamic tree) needs an EAGLE-3 head as draft=; got "
                             f"draft={draft!r}: use a static tree such as draft_tree=(2, 2) instead")
        if eagle3 and cuda_graphs:
            raise ValueError("cuda_graphs=True does not cover EAGLE-3 heads yet (they run eagerly): pass "
                             "cuda_graphs=False or None")
        if eagle3 and adaptive:
            raise ValueError("adaptive speculation is not available with an EAGLE-3 head yet: pass adaptive=False")
        if eagle3:
            cuda_graphs, adaptive = False, False
        tree = TreeShape.of(draft_tree) if draft_tree is not None and dynamic is None else None
        # -- eagle3 (end) --
        if tree is not None and draft_kind == "none":
            raise ValueError("draft_tree needs a drafter: pass draft='ngram', 'early-exit:N' or a model directory")
        for name, flag in (("adaptive", adaptive), ("cuda_graphs", cuda_graphs)):
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"{name} must be True, False or None, got {flag!r}")
        graphs_possible = self.device.type == "cuda" and backend == "triton"
        graphs_cover = draft_kind != "ngram" and tree is None  # n-gram drafts come from the host
        if cuda_graphs and not graphs_possible:
            raise ValueError(f"cuda_graphs=True needs a CUDA device and the Triton backend, got device "
                             f"{self.device} and backend {backend!r}: pass cuda_graphs=False")
        if cuda_graphs and not graphs_cover:
            raise ValueError("cuda_graphs=True does not cover the n-gram drafter or draft trees (they run "
                             "eagerly): pass cuda_graphs=False or None")
        if adaptive and (tree is not None or draft_kind == "none"):
            raise ValueError("adaptive speculation chooses a chain length: it needs a drafter and no "
                             "draft_tree; pass adaptive=False")
        if cuda_graphs is None:
            cuda_graphs = graphs_possible and graphs_cover
        if adaptive is None:
            adaptive = cuda_graphs and draft_kind != "none"

        self.target = load_model(target, self.device, self.dtype)
        self.config = self.target.config
        # generation_config.json: more EOS ids (chat models list their turn-end tokens
        # there) and default sampling values; a token either file names ends generation
        self.generation_defaults = GenerationDefaults.from_dir(target)
        gen_eos = self.generation_defaults.eos_token_ids or ()
        self.eos_token_ids = tuple(dict.fromkeys(self.config.eos_token_ids + gen_eos))
        self.tokenizer = load_tokenizer(target)
        self.ops = get_backend(backend)
        draft_model = None
        if draft_kind == "model" and not eagle3:
            draft_model = load_model(draft, self.device, self.dtype)
            if draft_model.config.vocab_size != self.config.vocab_size:
                raise ValueError(
                    f"the draft model {draft} has a vocabulary of {draft_model.config.vocab_size} tokens "
                    f"but the target {target} has {self.config.vocab_size}: a draft must share the "
                    "target's vocabulary"
                )
        if draft_kind == "early-exit":
            n = int(str(draft).split(":", 1)[1])
            if not 1 <= n <= self.config.num_layers - 1:
                raise ValueError(
                    f"early-exit:{n} needs 1 <= N <= {self.config.num_layers - 1} (the target has "
                    f"{self.config.num_layers} layers)"
                )
        k = 0 if draft_kind == "none" else (tree.num_nodes if tree is not None else num_draft_tokens)
        # -- eagle3 (begin): load the head, check it against the target; its one-layer cache --
        head_cfg = head_tensors = None
        if eagle3:
            head_cfg, head_tensors = load_eagle3(draft)
            check_against_target(head_cfg, self.config)
            if dynamic is not None:
                k = dynamic.cache_slots
        # -- eagle3 (end) --

        # -- the paged KV cache, sized from the memory budget --
        cfg = self.config
        per_block = KVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if draft_model is not None:
            dc = draft_model.config
            per_block += KVCache.bytes_per_block(dc.num_layers, block_size, dc.num_kv_heads, dc.head_dim, self.dtype)
        if head_cfg is not None:  # eagle3
            per_block += KVCache.bytes_per_block(1, block_size, head_cfg.num_key_value_heads, head_cfg.head_dim,
                                                 self.dtype)
        budget = int(kv_cache_memory) if kv_cache_memory is not None else self._default_budget()
        full = max_num_seqs * cdiv(cfg.max_position_embeddings + k, block_size)
        num_blocks = min(budget // per_block - 1, full)  # one more: the scratch block of padded rows
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes holds fewer than two KV blocks of {per_block} bytes")
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = KVCache(cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                             self.dtype, self.device)

        if draft_kind == "none":
            drafter = Drafter()
        elif draft_kind == "ngram":
            drafter = NgramDrafter(tree=tree)
        elif draft_kind == "early-exit":
            drafter = ModelDrafter(self.target, self.cache, self.blocks, self.ops, num_layers=n,
                                   shares_target_cache=True, name=f"early-exit:{n}", tree=tree)
        elif eagle3:  # -- eagle3 (begin) --
            head = Eagle3Head(head_cfg, head_tensors, self.target.model.embed_tokens.weight, self.device, self.dtype)
            head_cache = KVCache(1, num_blocks + 1, block_size, head_cfg.num_key_value_heads, head_cfg.head_dim,
                                 self.dtype, self.device)
            drafter = Eagle3Drafter(head, head_cache, self.blocks, self.ops,
                                    head_cfg.aux_layers(self.config.num_layers), tree=dynamic or tree,
                                    name=str(draft))  # -- eagle3 (end) --
        else:
            dc = draft_model.config
            draft_cache = KVCache(dc.num_layers, num_blocks + 1, block_size, dc.num_kv_heads, dc.head_dim,
                                  self.dtype, self.device)
            drafter = ModelDrafter(draft_model, draft_cache, self.blocks, self.ops, name=str(draft), tree=tree)
        self.drafter = drafter
        self.engine = Engine(self.target, self.cache, self.blocks, self.ops, drafter, k,
                             eos_token_ids=self.eos_token_ids, max_num_seqs=max_num_seqs,
                             tokenizer=self.tokenizer,
                             draft_depth=(dynamic or tree).depth if (dynamic or tree) is not None else None,
                             speculation=AdaptiveSpeculation(k) if adaptive else None)
        if cuda_graphs:
            self.engine.runner = self.decode_runner(use_graphs=True)
        self._rng = random.Random(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little"))
        self._next_id = 0

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _draft_kind(draft) -> str:
        """'none', 'ngram', 'early-exit' or 'model'. The reserved names win over a folder of
        the same name (pass ``Path("ngram")`` or ``"./ngram"`` for that); a path must be a
        directory with a config.json."""
        if draft is None:
            return "none"
        if isinstance(draft, str) and draft == NGRAM:
            return "ngram"
        if isinstance(draft, str) and draft.startswith(EARLY_EXIT):
            n = draft[len(EARLY_EXIT):]
            if not n.isdigit():
                raise ValueError(f"early-exit drafter needs a layer count, e.g. 'early-exit:2'; got {draft!r}")
            return "early-exit"
        if isinstance(draft, (str, Path)) and Path(draft).exists():
            if not (Path(draft) / "config.json").is_file():
                raise ValueError(f"draft {str(draft)!r} is not a model directory (no config.json in it); "
                                 f"use one of {', '.join(DRAFTER_NAMES)}")
            return "model"
        raise ValueError(
            f"draft {draft!r} is not a known drafter nor an existing path; use one of {', '.join(DRAFTER_NAMES)}"
        )

    def decode_runner(self, use_graphs: bool) -> DecodeRunner:
        """The fixed-shape decode step of this model and drafter (CUDA graphs when
        ``use_graphs``; eagerly otherwise, which is how the CPU tests exercise it)."""
        return DecodeRunner(self.target, self.cache, self.ops, self.drafter,
                            max_k=self.engine.num_draft_tokens, max_batch=self.engine.max_num_seqs,
                            max_context=self.config.max_position_embeddings, block_size=self.blocks.block_size,
                            scratch_block=self.blocks.num_blocks, use_graphs=use_graphs)

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
        if batch_sizes is None:
            batch_sizes = list(range(1, self.engine.max_num_seqs + 1))
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        return self.engine.warm_up(batch_sizes, tuple(modes))

    def _default_budget(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.7)
        return 1 << 30

    # ------------------------------------------------------------------ requests
    def _make_sequences(self, prompts, params) -> list[Sequence]:
        """Validate every prompt and parameter set before any work starts."""
        if _is_prompt(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a str, a list of str, or a list of token-id lists (non-empty)")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: pass one, or one per prompt")
        vocab, context = self.config.vocab_size, self.config.max_position_embeddings
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not SamplingParams")
            p = p.with_defaults(**self.generation_defaults.sampling())  # unset values: the model's
            if p.stop and self.tokenizer is None:
                raise ValueError(f"params[{i}] has stop strings {p.stop}, but stop strings need a tokenizer "
                                 "and this model directory has none: use stop_token_ids")
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError(f"prompt {i} is empty")
                if self.tokenizer is None:
                    raise ValueError("this model directory has no tokenizer: pass prompts as token-id lists")
                ids, text = self.tokenizer.encode(prompt), prompt
            elif isinstance(prompt, (list, tuple)):
                ids, text = list(prompt), None
                if not ids:
                    raise ValueError(f"prompt {i} is an empty token list")
                bad = [t for t in ids if not _is_token_id(t) or not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
                ids = [int(t) for t in ids]
            else:
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}; expected str or list of int")
            if len(ids) > context or (len(ids) == context and p.max_tokens > 0):
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens but the model's context is {context} tokens: "
                    "shorten the prompt"
                )
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
        if not _is_prompt(prompt):
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
            pending = [r for r in requests if not r.finished]
            bar.update(len(requests) - len(pending))
            while pending:
                self._step_until_progress(pending[0])
                failed = next((r for r in requests if r.finish_reason == "error"), None)
                if failed is not None:
                    raise failed.error
                still = [r for r in pending if not r.finished]
                bar.update(len(pending) - len(still))
                pending = still
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
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template and this model directory has no "
                             "tokenizer: pass token ids to generate()")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template (no chat_template in its "
                             "tokenizer_config.json or chat_template.jinja): it is likely a base model; format "
                             "the prompt yourself and call generate(), or pass chat_template=")
        if not _is_conversation(conversation):
            raise ValueError("a conversation must be a non-empty list of {'role': str, 'content': str} dicts, "
                             f"got {conversation!r:.200}")
        ids = self.tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

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
        conversations = [messages] if _is_conversation(messages) else messages
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError("messages must be a conversation (a list of {'role', 'content'} dicts) or a "
                             "non-empty list of conversations")
        prompts = [self.render_chat(c, chat_template) for c in conversations]
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
        if not _is_prompt(prompt):
            raise TypeError("stream() takes one prompt: a str or a list of token ids")
        (seq,) = self._make_sequences([prompt], params)
        return self._stream(seq)

    def _stream(self, seq: Sequence) -> Iterator[str]:
        request = self._register(seq)
        try:
            while True:
                done = request.finished  # read before the flush: the flush then holds everything
                piece = request.new_text()
                if piece:
                    yield piece  # others may step the engine (and finish this request) meanwhile
                if done:
                    break
                if not request.finished:
                    self._step_until_progress(request)
            if request.finish_reason == "error":
                raise request.error
        finally:
            request.cancel()  # a no-op once finished

    def metrics(self) -> dict:
        """Totals over every request this instance served."""
        t = self.engine.totals
        return {
            "num_requests": self._next_id,
            "num_steps": t.num_steps,
            "num_generated_tokens": t.num_generated,
            "num_draft_tokens": t.num_draft_tokens,
            "num_accepted_tokens": t.num_accepted_tokens,
            "acceptance_rate": t.acceptance_rate,
            "mean_accepted_length": t.mean_accepted_length,
            "acceptance_rate_by_position": [a / p if p else 0.0 for a, p in
                                            zip(t.accepted_per_position, t.proposed_per_position)],
            "accepted_per_position": list(t.accepted_per_position),
            "proposed_per_position": list(t.proposed_per_position),
            # generated tokens per second of engine time (steps), not the callers' time between them
            "tokens_per_second": t.num_generated / self.engine.busy_seconds if self.engine.busy_seconds else 0.0,
            "chain_length": self.engine.last_k,  # the latest step's k (adaptive speculation varies it)
            "measured_alpha": self.engine.speculation.alpha if self.engine.speculation is not None else None,
        }


def _is_token_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _is_conversation(messages) -> bool:
    """One chat conversation: a non-empty list of {"role": str, "content": ...} dicts."""
    return (isinstance(messages, (list, tuple)) and bool(messages) and
            all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages))


def _is_prompt(prompt) -> bool:
    """One prompt: a str or a non-empty list / tuple of integer token ids."""
    return isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt) and
                                       all(_is_token_id(t) for t in prompt))
