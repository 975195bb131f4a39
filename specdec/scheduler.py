"""Which sequences run, and what a step's tokens do to them.

    waiting (deque) --admit--> running (list, oldest first) --finish--> retired
        ^                          |
        +--------preempt-----------+   (the newest, when the cache cannot grow)

* ``schedule()`` grows every running sequence's block table to hold its tokens and a
  step's drafts, preempting the newest running sequence while the cache is full
  (recompute-style: its blocks are freed, its tokens kept, it re-queues first), then
  admits waiting requests while blocks and ``max_num_seqs`` allow.
* ``postprocess(seqs, result)`` commits a step's host rows: checks the tokens, tells the
  drafter what was accepted, keeps the target cache up to the accepted drafts, appends
  tokens until a stop condition (EOS, stop ids, stop strings, max_tokens, the context).
* ``retire`` frees a finished request's blocks and counts its metrics once.

Counters ``num_admissions`` and ``num_preemptions`` count admissions (re-admissions
included) and preemptions since construction.
"""

from __future__ import annotations

from collections import deque

from .detokenize import stop_window_text
from .drafters.base import Drafter
from .kv_cache import BlockManager, CacheCapacityError, cdiv
from .runners.result import StepResult
from .sequence import RequestMetrics, Sequence, Status


class NonFiniteLogitsError(RuntimeError):
    """The target produced NaN or +inf logits for a request."""


class Scheduler:
    """Queues, admission, preemption, stop conditions of the engine's requests.

    blocks:           the KV block manager shared by every cache
    drafter:          told what each step accepted, and what preemption dropped
    num_draft_tokens: cache slots a step's drafts use (tree nodes)
    draft_depth:      drafts on one path (the chain length k at most)
    max_context:      the model's context length
    vocab_size:       emitted ids outside [0, vocab_size) fail their request
    """

    def __init__(self, blocks: BlockManager, drafter: Drafter, *, num_draft_tokens: int, draft_depth: int,
                 max_num_seqs: int, max_context: int, vocab_size: int, eos_token_ids=(), tokenizer=None):
        self.blocks, self.drafter = blocks, drafter
        self.num_draft_tokens, self.draft_depth = num_draft_tokens, draft_depth
        self.max_num_seqs, self.max_context, self.vocab_size = max_num_seqs, max_context, vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.totals = RequestMetrics()  # every retired request's metrics
        self.num_admissions = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests
    def max_tokens_held(self, seq: Sequence) -> int:
        """The most cache slots ``seq`` can ever occupy (prompt, output, drafts)."""
        total = min(seq.num_prompt + seq.params.max_tokens, self.max_context)
        return total + self.num_draft_tokens

    def check_fits(self, seq: Sequence) -> None:
        need = cdiv(self.max_tokens_held(seq), self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise CacheCapacityError(
                f"request of {seq.num_prompt} prompt tokens + max_tokens={seq.params.max_tokens} "
                f"needs {need} KV blocks of {self.blocks.block_size} tokens but the cache has only "
                f"{self.blocks.num_blocks}: raise the KV-cache budget or lower max_tokens"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, seq: Sequence) -> None:
        """Stop one request wherever it is (finish reason 'abort') and release its blocks;
        a request that already finished is left as it is."""
        if seq.finished:
            return
        self.finish(seq, "abort")
        self.retire(seq)

    def abort_all(self) -> list[Sequence]:
        """Cancel every request (finish reason 'abort'); returns them."""
        dropped = self.running + list(self.waiting)
        for seq in dropped:
            self.cancel(seq)
        return dropped

    def fail(self, seq: Sequence, error: Exception) -> None:
        seq.error = error
        self.finish(seq, "error")

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def retire(self, seq: Sequence) -> None:
        """A finished request leaves the engine: blocks freed, metrics counted once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        self.totals.merge(seq.metrics)

    def retire_finished(self, seqs: list[Sequence]) -> list[Sequence]:
        """Retire the finished ones among ``seqs``; returns them."""
        finished = [s for s in seqs if s.finished]
        for seq in finished:
            self.retire(seq)
        return finished

    # ------------------------------------------------------------------ scheduling
    def _slots_needed(self, seq: Sequence) -> int:
        return len(seq.tokens) + self.num_draft_tokens

    def preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the cache, keep the tokens, re-queue first."""
        self.blocks.free(seq.seq_id)
        seq.target_len = 0
        self.drafter.forget(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[Sequence]:
        """Grow the running sequences' blocks (preempting the newest while the cache is
        full), admit waiting ones while blocks last; returns the step's sequences."""
        for seq in list(self.running):  # oldest first
            if seq not in self.running:
                continue
            while self.blocks.blocks_needed(seq.seq_id, self._slots_needed(seq)) > self.blocks.num_free_blocks:
                self.preempt(self.running[-1])
                if seq not in self.running:
                    break
            else:
                self.blocks.allocate(seq.seq_id, self._slots_needed(seq))
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.blocks.blocks_needed(seq.seq_id, self._slots_needed(seq)) > self.blocks.num_free_blocks:
                break
            self.blocks.allocate(seq.seq_id, self._slots_needed(seq))
            seq.status = Status.RUNNING
            self.running.append(self.waiting.popleft())
            self.num_admissions += 1
        return list(self.running)

    def draft_limits(self, seqs: list[Sequence], k: int) -> list[int]:
        """At most ``k`` drafts each, none past max_tokens (a step always adds one sampled
        token) or the context."""
        limits = []
        for seq in seqs:
            left = min(seq.params.max_tokens - seq.num_generated, self.max_context - len(seq.tokens))
            limits.append(min(k, max(0, min(self.draft_depth, left - 1))))
        return limits

    # ------------------------------------------------------------------ a step's tokens
    def postprocess(self, seqs: list[Sequence], result: StepResult) -> None:
        """Commit a fetched step: rows with non-finite logits fail their request, the
        others append their accepted drafts and sampled token."""
        for seq, row, ok, n_draft, depth in zip(seqs, result.rows, result.finite, result.counts, result.depths,
                                                  strict=True):
            if not ok:
                self.fail(seq, NonFiniteLogitsError(
                    f"the target produced NaN or +inf logits for request {seq.seq_id} at step {seq.step}; "
                    "that request was stopped, the others continue. Check the checkpoint and the dtype "
                    "(fp16 overflows on some models)."))
                continue
            try:
                self._commit(seq, row, n_draft, depth)
            except Exception as error:
                self.fail(seq, error)

    def _commit(self, seq: Sequence, row: list[int], n_draft: int, depth: int) -> None:
        """Append one sequence's accepted drafts and sampled token (row = [a, tokens...])."""
        a = row[0]
        emitted = row[1:a + 2]
        vocab = self.vocab_size
        bad = [t for t in emitted if not 0 <= t < vocab]
        if bad:
            raise RuntimeError(f"the sampler returned token id(s) {bad} for request {seq.seq_id} at step "
                               f"{seq.step}, outside the vocabulary [0, {vocab}); the request was stopped")
        self.drafter.commit(seq, a)
        seq.target_len = len(seq.tokens) + a  # pending token + accepted drafts are cached
        self.blocks.truncate(seq.seq_id, max(seq.target_len, seq.draft_len))
        seq.step += 1
        n_kept = self._append(seq, emitted)
        seq.metrics.record_step(n_draft, min(a, n_kept), n_kept, depth)

    def _append(self, seq: Sequence, emitted: list[int]) -> int:
        """Append tokens until a stop condition; returns how many were kept."""
        p = seq.params
        kept = 0
        for tok in emitted:
            seq.tokens.append(tok)
            kept += 1
            if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                self.finish(seq, "stop")
            elif p.stop and self.hits_stop_string(seq):
                self.finish(seq, "stop")
            elif seq.num_generated >= p.max_tokens or len(seq.tokens) >= self.max_context:
                self.finish(seq, "length")
            if seq.finished:
                break
        return kept

    def hits_stop_string(self, seq: Sequence) -> bool:
        """Whether the text after the prompt contains one of the request's stop strings."""
        if self.tokenizer is None:
            return False
        longest = max(len(s) for s in seq.params.stop)
        tail = stop_window_text(self.tokenizer, seq.tokens, seq.num_prompt, longest)
        return any(s in tail for s in seq.params.stop)
