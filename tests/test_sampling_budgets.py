"""Memory-traffic and grid budgets of the chain sampler, counted under the interpreter.

"Passes" are the bytes the kernels load from the target logits divided by their size
(tests/load_counter.py); a read-once sampler is at 1.0. The budgets (B = 1, k = 4,
V = 131,072): <= 1.25 passes unfiltered, <= 2.5 with top_k = 50 and top_p = 0.9; and at
batch 1 with V = 128,256 the largest launch has >= 32 programs (one program per sequence
would leave all but one SM idle).
"""

import pytest
import torch

from load_counter import LoadCounter
from specdec.kernels.rejection_sampling import rejection_sample

B, K, V = 1, 4, 131072


def _chain_args(vocab, top_k, top_p, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * (K + 1), vocab, generator=g) * 2.0
    ids = torch.randint(0, vocab, (B * K,), generator=g)
    i32, i64 = torch.int32, torch.int64
    return (logits, ids, None, torch.tensor([0, K], dtype=i32), K, torch.ones(B),
            torch.full((B,), top_k, dtype=i32), torch.full((B,), top_p),
            torch.zeros(B, dtype=i64), torch.zeros(B, dtype=i64))


@pytest.mark.parametrize("top_k,top_p,budget", [(0, 1.0, 1.25), (50, 0.9, 2.5)])
def test_passes_over_the_target_logits(top_k, top_p, budget):
    args = _chain_args(V, top_k, top_p)
    with LoadCounter(logits=args[0]) as counter:
        rejection_sample(*args, check_finite=False)
    passes = counter.passes("logits")
    assert 1.0 <= passes <= budget, f"{passes:.3f} passes over the logits (budget {budget})"


def test_batch_one_spreads_over_the_gpu():
    # count the grids only: a dry run launches nothing
    args = _chain_args(128256, 0, 1.0)
    with LoadCounter(dry_run=True) as counter:
        rejection_sample(*args, check_finite=False)
    assert counter.max_programs >= 32, counter.launches


def test_load_counter_counts_masked_loads_only():
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    x, y = torch.randn(100), torch.empty(100)
    with LoadCounter(x=x, y=y) as counter:
        _copy[(4,)](x, y, 100, BLOCK=32)
    assert counter.bytes == {"x": 400, "y": 0} and counter.passes("x") == 1.0
    assert counter.launches == [("_copy", (4, 1, 1))] and counter.max_programs == 4
    assert torch.equal(x, y)
