"""Engine test helpers shared by the engine, tree-engine, generation-config and graph tests.

* ``greedy_ref(path, prompt, n)``: the oracle, plain greedy decoding with full no-cache
  forwards (``model(input_ids)``), memoised per (checkpoint, prompt, n, eos, context);
  ``cached_model(path)`` loads each checkpoint once;
* ``poison_caches(llm)``: NaN in every KV cache slot, so a read of an unwritten slot
  makes the logits NaN and the step raises;
* ``draft_arg(dirs, family, drafter)``: the ``draft=`` argument of a drafter name;
* ``random_prompts(lengths)``, ``PROMPTS``: seeded prompts (ragged lengths crossing
  block boundaries, plus a repetitive one the n-gram drafter can use);
* ``record_running(llm)``: records how many sequences the scheduler runs per step;
* ``kv_at(cache, blocks, seq_id, n)``: the K, V a sequence holds at positions 0..n-1;
* ``ScheduledK``: a stand-in for the adaptive speculation controller.
"""

from __future__ import annotations

import torch

from specdec.drafters.draft_model import ModelDrafter
from specdec.models import load_model

_MODELS: dict = {}
_GREEDY: dict = {}


def cached_model(path):
    """The model of a checkpoint, loaded once per path."""
    if str(path) not in _MODELS:
        _MODELS[str(path)] = load_model(path)
    return _MODELS[str(path)]


def greedy_ref(path, prompt, n, eos=(), context=None):
    """Plain greedy decoding with full no-cache forwards: up to ``n`` tokens, stopping
    after the first token in ``eos`` or when prompt + output fills ``context``."""
    key = (str(path), tuple(prompt), n, tuple(eos), context)
    if key not in _GREEDY:
        model, toks = cached_model(path), list(prompt)
        while len(toks) - len(prompt) < n and (context is None or len(toks) < context):
            toks.append(int(model(torch.tensor([toks]))[0, -1].argmax()))
            if toks[-1] in eos:
                break
        _GREEDY[key] = toks[len(prompt):]
    return _GREEDY[key]


def draft_arg(dirs, family, drafter):
    """The ``draft=`` argument for a drafter name: "draft-model", "near-draft" and "self"
    name checkpoints in ``dirs``; any other name is passed as is."""
    if drafter == "draft-model":
        return str(dirs["draft-model"])
    if drafter == "near-draft":
        return str(dirs[f"near-{family}"])
    if drafter == "self":
        return str(dirs[family])
    return drafter


def poison_caches(llm):
    """NaN in every cache slot: a read of an unwritten slot cannot go unnoticed."""
    caches = [llm.cache]
    if isinstance(llm.drafter, ModelDrafter) and not llm.drafter.shares_target_cache:
        caches.append(llm.drafter.cache)
    for cache in caches:
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))


def random_prompts(lengths, seed=0, vocab=97):
    """Seeded random prompts of the given lengths, token ids in [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ragged lengths crossing block boundaries, plus a repetitive prompt the n-gram drafter can use
PROMPTS = random_prompts([1, 4, 9, 17]) + [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]]


def record_running(llm):
    """Wrap the scheduler to record how many sequences run in each step."""
    scheduler = llm.engine.scheduler
    seen, schedule = [], scheduler.schedule

    def wrapped():
        seqs = schedule()
        seen.append(len(seqs))
        return seqs

    scheduler.schedule = wrapped
    return seen


def kv_at(cache, blocks, seq_id, n):
    """K, V of positions 0..n-1 of a sequence: [layers, n, H_kv, D] each."""
    slots = torch.tensor(blocks.slots(seq_id, list(range(n))), dtype=torch.int64)
    L, NB, BS, H, D = cache.k.shape
    return (cache.k.reshape(L, NB * BS, H, D)[:, slots].clone(),
            cache.v.reshape(L, NB * BS, H, D)[:, slots].clone())


class ScheduledK:
    """Stands in for the adaptive controller: plays a fixed schedule of chain lengths."""

    alpha = float("nan")  # measures nothing

    def __init__(self, ks: list[int]):
        self.ks, self.chosen = iter(ks), []

    def choose(self, batch_size):
        self.chosen.append(next(self.ks))
        return self.chosen[-1]

    def observe(self, proposed, accepted):
        pass

    def record(self, *args, **kwargs):
        pass

    def has_costs(self, batch_size):
        return True
