"""Per-request state (Sequence) and what a finished request returns (RequestOutput)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Speculation counters of one request.

    num_steps:           target forwards that emitted tokens for this request
    num_draft_steps:     those of them that verified at least one draft token
    num_draft_tokens:    draft tokens proposed to the target
    num_accepted_tokens: draft tokens the target accepted
    num_generated:       tokens emitted (accepted drafts + one sampled token per step)
    accepted_per_position[i]: how often a draft token at position (tree depth) i was accepted
    proposed_per_position[i]: how often a draft reached position (tree depth) i
    """

    num_steps: int = 0
    num_draft_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_generated: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward (1.0 for plain decoding)."""
        return self.num_generated / self.num_steps if self.num_steps else 0.0

    @property
    def accepted_length_per_draft_step(self) -> float:
        """1 + accepted drafts per step that verified drafts: the figure vLLM and SGLang report
        as the mean acceptance length (EAGLE's τ). Unlike ``mean_accepted_length`` it leaves
        out steps that drafted nothing, such as a hidden-state drafter's prefill. 0 without
        such steps."""
        return 1 + self.num_accepted_tokens / self.num_draft_steps if self.num_draft_steps else 0.0

    @property
    def acceptance_rate_by_position(self) -> list[float]:
        """Accepted / proposed drafts at each position (tree depth); 0 where none was proposed."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position,
                                                     strict=True)]

    def as_dict(self) -> dict:
        """The counters and rates under ``LLM.metrics()``'s names."""
        return {
            "num_steps": self.num_steps,
            "num_draft_steps": self.num_draft_steps,
            "num_generated_tokens": self.num_generated,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "accepted_length_per_draft_step": self.accepted_length_per_draft_step,
            "acceptance_rate_by_position": self.acceptance_rate_by_position,
            "accepted_per_position": list(self.accepted_per_position),
            "proposed_per_position": list(self.proposed_per_position),
        }

    def since(self, earlier: RequestMetrics) -> RequestMetrics:
        """What was counted after ``earlier``, a snapshot of these same metrics."""
        out = RequestMetrics(num_steps=self.num_steps - earlier.num_steps,
                             num_draft_steps=self.num_draft_steps - earlier.num_draft_steps,
                             num_draft_tokens=self.num_draft_tokens - earlier.num_draft_tokens,
                             num_accepted_tokens=self.num_accepted_tokens - earlier.num_accepted_tokens,
                             num_generated=self.num_generated - earlier.num_generated)
        out._merge_positions(self, 1)
        out._merge_positions(earlier, -1)
        return out

    def record_step(self, num_draft: int, num_accepted: int, num_emitted: int, depth: int | None = None) -> None:
        """One step: ``num_draft`` tokens proposed (tree nodes), ``depth`` positions deep
        (= num_draft for a chain), ``num_accepted`` accepted, ``num_emitted`` kept."""
        depth = num_draft if depth is None else depth
        self.num_steps += 1
        self.num_draft_steps += num_draft > 0
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        self.num_generated += num_emitted
        grow = depth - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(depth):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += i < num_accepted

    def merge(self, other: RequestMetrics) -> None:
        self.num_steps += other.num_steps
        self.num_draft_steps += other.num_draft_steps
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_generated += other.num_generated
        self._merge_positions(other, 1)

    def _merge_positions(self, other: RequestMetrics, sign: int) -> None:
        for mine, theirs in ((self.proposed_per_position, other.proposed_per_position),
                             (self.accepted_per_position, other.accepted_per_position)):
            mine += [0] * max(0, len(theirs) - len(mine))
            for i, n in enumerate(theirs):
                mine[i] += sign * n


@dataclass
class RequestOutput:
    """The result of one request.

    prompt_token_ids: the prompt as token ids
    token_ids:        generated token ids (up to and including a stop token)
    text:             generated text (cut before a stop string; '' without a tokenizer)
    finish_reason:    'stop' (EOS, stop token or stop string), 'length' (max_tokens or the
                      context), 'abort' (cancelled) or 'error' (see ``error``); None while
                      the request runs
    metrics:          RequestMetrics
    error:            the exception that ended the request when finish_reason is 'error'
    """

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestMetrics
    error: BaseException | None = None


class Sequence:
    """One request inside the engine.

    tokens holds the prompt followed by every emitted token. ``target_len`` counts the
    leading tokens whose K/V are in the target's cache (all but the last emitted one
    after a step; the scheduler and the engine write it); ``draft_len`` the same for a draft
    model with a cache of its own (written only by the drafter, specdec/drafters/).
    ``step`` counts the steps taken: it is the offset of the request's random draws.
    """

    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, seed: int,
                 prompt: str | None = None):
        self.seq_id = seq_id
        self.prompt = prompt
        self.params = params
        self.seed = seed
        self.tokens: list[int] = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.status = Status.WAITING
        self.target_len = 0
        self.draft_len = 0
        self.step = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None  # why it finished with reason 'error'
        self.metrics = RequestMetrics()

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
