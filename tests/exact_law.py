"""The exact law a request samples from, enumerated with the no-cache forward.

Shared by the engine distribution tests (test_distribution.py, test_tree_engine.py):
``next_token_probs`` is the law of the next token after each prefix
(``model(input_ids)`` then ``reference.sampling_probs``: temperature, top-k, top-p), and
``exact_joint`` the joint law of the next ``N_TOKENS`` tokens, V ** N_TOKENS outcomes.
Both assume the tiny vocabulary (V = 8) of the distribution tests' checkpoints, which
``distribution_checkpoints`` and ``window_checkpoints`` build.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from checkpoints import make_checkpoint, perturbed_copy

from specdec import SamplingParams
from specdec.kernels import reference
from specdec.models import load_model

V = 8  # vocabulary size of the distribution tests' checkpoints
N_TOKENS = 3  # generated tokens whose joint law is tested: V ** 3 = 512 outcomes
# far from peaked (std 0.5: the most likely token has ~0.3 of the mass)
ARCH = dict(vocab_size=V, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=24,
            max_position_embeddings=64, std=0.5)


def _check_filter_margins(logits: torch.Tensor, params: SamplingParams, margin: float = 1e-3) -> None:
    """The top-k / top-p cut of every row must sit far from a tie, so the few-ulp
    difference between the engine's cached forward and the no-cache one cannot move it."""
    x = logits.double() / params.temperature
    srt = torch.sort(x, dim=-1, descending=True).values  # [M, V]
    k = params.top_k if 0 < params.top_k < V else V
    if k < V:
        gap = (srt[:, k - 1] - srt[:, k]).min()
        assert gap > margin, f"top_k={k} cuts within {float(gap):.2g} of a tie; pick another"
        srt = srt[:, :k]
    if params.top_p < 1:
        p = torch.softmax(srt, dim=-1)
        above = torch.cumsum(p, dim=-1) - p  # mass strictly above each kept token
        gap = (above - params.top_p).abs().min()
        assert gap > margin, f"top_p={params.top_p} cuts within {float(gap):.2g} of a token; pick another"


def next_token_probs(model, prefixes: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """prefixes [M, L] int64 -> [M, V] float64, the law a request samples its next token from."""
    logits = model(prefixes)[:, -1]  # [M, V]
    _check_filter_margins(logits, params)
    m = prefixes.shape[0]
    return reference.sampling_probs(
        logits, torch.full((m,), params.temperature), torch.full((m,), params.top_k, dtype=torch.int32),
        torch.full((m,), params.top_p),
    ).double()


def exact_joint(model, prompt: list[int], params: SamplingParams, n: int = N_TOKENS):
    """The target's joint law of the next ``n`` tokens after ``prompt``.

    returns: joint [V ** n] float64, outcome (t_0, .., t_{n-1}) at index sum t_i V^(n-1-i);
             kept [V ** 0 + .. + V ** (n-1)] int64, tokens left by top-k/top-p per prefix
    """
    prefixes = torch.tensor([prompt], dtype=torch.int64)  # [M, P + i], M = V ** i
    joint = torch.ones(1, dtype=torch.float64)
    kept = []
    for _ in range(n):
        m = prefixes.shape[0]
        p = next_token_probs(model, prefixes, params)  # [M, V]
        kept.append((p > 0).sum(-1))
        joint = (joint[:, None] * p).reshape(-1)  # [M * V]
        prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(m)[:, None]], 1)
    return joint / joint.sum(), torch.cat(kept)


def distribution_checkpoints(root):
    """A 2-layer V = 8 target, an unrelated 1-layer draft ("model", overlap sum min(p, q)
    ~0.5 with the target) and the target plus noise ("near": under top-k/top-p it keeps
    the target's tokens where an unrelated draft rarely does); ``model`` is the loaded target."""
    target = make_checkpoint(root / "target", num_layers=2, seed=1, **ARCH)
    draft = make_checkpoint(root / "draft", num_layers=1, seed=2, **ARCH)
    near = perturbed_copy(target, root / "near", noise=0.25, seed=3)
    return SimpleNamespace(target=target, dirs={"model": draft, "near": near}, model=load_model(target))


def window_checkpoints(root):
    """A 2-layer V = 8 Gemma 2 target whose first layer attends over a 4-position window
    with soft-capped scores and logits, and a noisy copy ("near")."""
    target = make_checkpoint(root / "target", "gemma2", num_layers=2, seed=1, sliding_window=4, **ARCH)
    near = perturbed_copy(target, root / "near", noise=0.25, seed=3)
    return SimpleNamespace(target=target, dirs={"near": near}, model=load_model(target))
