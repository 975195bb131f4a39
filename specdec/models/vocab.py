"""Draft models whose vocabulary is padded to another size than the target's.

Checkpoints of one family often share a tokenizer but pad the embedding to different sizes
(Qwen2.5-0.5B / 1.5B: 151,936 rows, 7B and larger: 152,064; Gemma 3 1B: 262,144, 4B and
larger: 262,208). The rows past the tokenizer's ids are padding no text ever produces. Such
a draft is usable once its rows are fitted to the target's count: ``check_draft_vocab``
decides whether a pair qualifies (before anything is allocated), ``fit_vocab`` adapts the
loaded draft.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .llama import LlamaForCausalLM
from .loader import load_tokenizer


def check_draft_vocab(draft_dir: str | Path, draft_vocab: int, target_dir: str | Path, target_vocab: int,
                      name: str) -> None:
    """ValueError unless a draft of ``draft_vocab`` rows can serve a target of ``target_vocab``:
    equal sizes, or the same tokenizer in both directories with every one of its ids below
    both sizes (so only padding rows differ)."""
    if draft_vocab == target_vocab:
        return
    what = (f"the draft model {name} has a vocabulary of {draft_vocab} tokens but the target {target_dir} has "
            f"{target_vocab}")
    toks = {}
    for role, path in (("draft", draft_dir), ("target", target_dir)):
        toks[role] = load_tokenizer(path)
        if toks[role] is None:
            raise ValueError(f"{what}: a draft whose vocabulary is padded to another size must use the target's "
                             f"tokenizer, and the {role} directory {path} has no tokenizer files to check that; "
                             "add them (tokenizer.json or tokenizer.model) or use a draft with the target's size")
    draft_ids, target_ids = toks["draft"].get_vocab(), toks["target"].get_vocab()
    if draft_ids != target_ids:
        diff = sorted(set(draft_ids.items()) ^ set(target_ids.items()))[:3]
        raise ValueError(f"{what}, and their tokenizers differ (e.g. {diff}): a draft must share the target's "
                         "tokenizer")
    top = max(target_ids.values()) + 1
    if top > min(draft_vocab, target_vocab):
        raise ValueError(f"{what}, and their shared tokenizer has ids up to {top - 1}: the smaller vocabulary "
                         "would cut real tokens off, not padding")


class PaddedVocabHead(nn.Module):
    """A draft's output head widened to the target's vocabulary: the draft's own logits,
    then -inf for the target's extra (padding) ids, which the draft thus never proposes."""

    def __init__(self, inner: nn.Module, vocab_size: int):
        super().__init__()
        self.inner, self.vocab_size = inner, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return F.pad(y, (0, self.vocab_size - y.shape[-1]), value=float("-inf"))


@torch.no_grad()
def fit_vocab(model: LlamaForCausalLM, vocab_size: int) -> None:
    """Fit a loaded draft's embedding and output head to ``vocab_size`` rows (after
    ``check_draft_vocab``). Extra rows (padding ids) are dropped. Missing rows are added: a
    zero embedding, as the target may still sample a padding id, and a -inf logit. The
    draft's distribution over real tokens is unchanged, and it is the q the rejection
    sampler verifies against, so the output stays the target's exactly."""
    emb = model.model.embed_tokens
    rows = emb.weight.shape[0]
    if rows == vocab_size:
        return
    tied = model.lm_head.weight is emb.weight
    if rows > vocab_size:
        emb.weight = nn.Parameter(emb.weight[:vocab_size].clone(), requires_grad=False)
        model.lm_head.weight = (emb.weight if tied else
                                nn.Parameter(model.lm_head.weight[:vocab_size].clone(), requires_grad=False))
    else:
        padded = torch.cat((emb.weight, emb.weight.new_zeros(vocab_size - rows, emb.weight.shape[1])))
        emb.weight = nn.Parameter(padded, requires_grad=False)
        if tied:  # the head keeps the real rows (a view of the padded table, no copy)
            model.lm_head.weight = nn.Parameter(padded[:rows], requires_grad=False)
        model.lm_head = PaddedVocabHead(model.lm_head, vocab_size)  # type: ignore[assignment]  # not a Linear
    emb.num_embeddings = vocab_size
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
