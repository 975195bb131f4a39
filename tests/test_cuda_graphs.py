"""The fixed-shape decode step (specdec/cuda_graphs.py) against the engine's general path.

What a CUDA graph replays is ``_StaticStep.draft`` and ``_StaticStep.verify`` on the
runner's static buffers; on the CPU the same code runs eagerly. Every seeded request
must come out token for token as the general path makes it — greedy, sampled and
filtered, plain decoding, early exit and a separate draft model, with batches that
need padding rows and sequences whose last step allows fewer drafts than the rest.
Graph capture itself needs CUDA (the ``gpu`` tests at the end).
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint, perturbed_copy
from eagle3_reference import make_eagle3_head
from engine_helpers import ScheduledK

from specdec import LLM, SamplingParams
from specdec.cuda_graphs import DecodeRunner, sampling_mode
from specdec.drafters.draft_model import ModelDrafter
from specdec.drafters.eagle3 import Eagle3Drafter

K = 3


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    target = make_checkpoint(root / "target", num_layers=3, seed=0)
    # a random EAGLE-3 head (reduced draft vocabulary) reading layers 0, 1, 2 of the target
    head = make_eagle3_head(root / "head", vocab_size=97, target_hidden=32, draft_vocab_size=60, aux_ids=[0, 1, 2],
                            std=0.3, seed=5)
    return {"target": target, "near": perturbed_copy(target, root / "near", noise=0.05, seed=4), "head": head}


def _poison(llm):
    caches = [llm.cache] + ([llm.drafter.cache] if isinstance(llm.drafter, (ModelDrafter, Eagle3Drafter)) else [])
    for cache in caches:
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))


def make_llm(dirs, draft, static: bool, backend="torch", **kw):
    draft = str(dirs[draft]) if draft in dirs else draft
    llm = LLM(str(dirs["target"]), draft=draft, num_draft_tokens=K, device="cpu", dtype=torch.float32,
              backend=backend, block_size=4, seed=0, **kw)
    _poison(llm)  # a read of an unwritten slot turns into NaN logits and raises
    if static:
        llm.engine.runner = llm.decode_runner(use_graphs=False)
    return llm


def _count_runs(llm):
    runs = []
    run = llm.engine.runner.run
    llm.engine.runner.run = lambda seqs, blocks, limits, mode, *rest: (
        runs.append((len(seqs), list(limits), mode)), run(seqs, blocks, limits, mode, *rest))[1]
    return runs


PROMPTS = [[5, 9, 13], list(range(20, 31)), [7] * 6]  # 3 sequences: bucket 4, one padding row
PARAMS = {
    "greedy": SamplingParams(max_tokens=13, temperature=0),
    "sample": SamplingParams(max_tokens=13, temperature=1.0),
    "filtered": SamplingParams(max_tokens=13, temperature=0.8, top_k=20, top_p=0.9),
}


@pytest.mark.parametrize("mode", list(PARAMS))
@pytest.mark.parametrize("draft", [None, "early-exit:2", "near", "head"])
def test_static_step_gives_the_general_paths_tokens(dirs, draft, mode):
    # different max_tokens: sequences reach their last, capped step at different times
    params = [SamplingParams(**{**vars(PARAMS[mode]), "max_tokens": n, "seed": 100 + i, "ignore_eos": True})
              for i, n in enumerate((13, 9, 11))]
    general = make_llm(dirs, draft, static=False).generate(PROMPTS, params)
    llm = make_llm(dirs, draft, static=True)
    runs = _count_runs(llm)
    static = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in static] == [o.token_ids for o in general]
    assert [o.metrics.num_draft_tokens for o in static] == [o.metrics.num_draft_tokens for o in general]
    # the same drafts were accepted: greedy tokens alone would not show a wrong draft
    assert [o.metrics.accepted_per_position for o in static] == [o.metrics.accepted_per_position for o in general]
    if draft == "head" and mode != "filtered":  # (top-k 20 of 97: a random head's drafts all miss)
        assert sum(o.metrics.num_accepted_tokens for o in static) > 0, "the head should get some drafts accepted"
    assert runs, "no step took the fixed-shape path"
    assert all(m == mode for *_, m in runs)
    assert any(b == 3 for b, *_ in runs)  # a padded bucket (3 of 4 rows)
    if draft is not None:
        assert any(len(set(lim)) > 1 for _, lim, _ in runs), "no step capped some sequences' drafts"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_static_step_continues_after_plain_steps_with_a_lagging_draft_cache(dirs):
    """A separate draft model's cache falls behind on plain (k = 0) steps; the next step
    with drafts cannot use the two-token static catch-up and takes the general path."""
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True)
    ks = [3, 0, 0, 2, 3, 1, 0, 3] * 4
    outs = {}
    for static in (False, True):
        llm = make_llm(dirs, "near", static=static)
        llm.engine.speculation = ScheduledK(ks)
        runs = _count_runs(llm) if static else None
        outs[static] = llm.generate([PROMPTS[1]], params)[0]
    assert outs[True].token_ids == outs[False].token_ids
    ran = [lim[0] for _, lim, _ in runs]
    assert 0 in ran and any(n > 0 for n in ran), ran
    assert len(ran) < outs[True].metrics.num_steps  # some steps fell back to the general path


def test_eagle3_static_steps_follow_any_chain_length(dirs):
    """EAGLE-3: the head's state crosses steps of changing k (plain k = 0 steps included)
    in the fixed-shape step's buffers; every decode step runs there, tokens as the general
    path's, and the head is re-fed only the committed positions' features."""
    params = [SamplingParams(max_tokens=n, temperature=1.0, seed=3 + n, ignore_eos=True) for n in (20, 14)]
    ks = [3, 0, 0, 2, 3, 1, 0, 3] * 6
    outs, accepted = {}, {}
    for static in (False, True):
        llm = make_llm(dirs, "head", static=static)
        llm.engine.speculation = ScheduledK(ks)
        runs = _count_runs(llm) if static else None
        done = llm.generate(PROMPTS[1:], params)
        outs[static] = [o.token_ids for o in done]
        accepted[static] = [o.metrics.num_accepted_tokens for o in done]
    assert outs[True] == outs[False]
    assert accepted[True] == accepted[False] and sum(accepted[True]) > 0
    ran = [max(lim) for _, lim, _ in runs]
    assert 0 in ran and 3 in ran, ran
    assert len(runs) > 5


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter
@pytest.mark.parametrize("draft", ["early-exit:2", "near", "head"])
def test_static_step_on_the_triton_kernels(dirs, draft):
    """The kernels under the fixed layout: padded rows, capped drafts, the scratch block."""
    params = [SamplingParams(max_tokens=n, temperature=1.0, seed=7 + n, ignore_eos=True) for n in (7, 5, 6)]
    general = make_llm(dirs, draft, static=False).generate(PROMPTS, params)
    llm = make_llm(dirs, draft, static=True, backend="triton")
    runs = _count_runs(llm)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in general]
    assert runs


def test_sampling_mode_of_a_batch(dirs):
    llm = make_llm(dirs, None, static=False)
    seqs = llm._make_sequences([[1, 2]] * 3, [PARAMS["greedy"], PARAMS["sample"], PARAMS["filtered"]])
    assert sampling_mode(seqs[:1]) == "greedy"
    assert sampling_mode(seqs[:2]) == "sample"
    assert sampling_mode(seqs) == "filtered"


def test_runner_refuses_what_it_cannot_run(dirs):
    with pytest.raises(ValueError, match="n-gram"):
        make_llm(dirs, "ngram", static=False).decode_runner(use_graphs=False)
    with pytest.raises(ValueError, match="trees"):
        make_llm(dirs, "early-exit:1", static=False, draft_tree=(2, 1)).decode_runner(use_graphs=False)
    llm = make_llm(dirs, None, static=False)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeRunner(llm.target, llm.cache, llm.ops, llm.drafter, max_k=0, max_batch=4, max_context=64,
                     block_size=4, use_graphs=True)


@pytest.mark.parametrize("kw, match", [
    (dict(cuda_graphs=True), "CUDA device"),
    (dict(cuda_graphs=1), "True, False or None"),
    (dict(adaptive=True, draft=None), "needs a drafter"),
    (dict(adaptive=True, draft="early-exit:1", draft_tree=(2,)), "draft_tree"),
])
def test_llm_flags_are_checked(dirs, kw, match):
    kw.setdefault("draft", "early-exit:1")
    with pytest.raises((ValueError, TypeError), match=match):
        LLM(str(dirs["target"]), device="cpu", **kw)


# ---------------------------------------------------------------------------------------
# CUDA graphs proper
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("draft", [None, "early-exit:2", "near"])
@pytest.mark.parametrize("mode", list(PARAMS))
def test_cuda_graphs_give_the_eager_tokens(dirs, draft, mode):
    draft = str(dirs[draft]) if draft in dirs else draft
    params = [SamplingParams(**{**vars(PARAMS[mode]), "max_tokens": n, "seed": 100 + i, "ignore_eos": True})
              for i, n in enumerate((13, 9, 11))]
    outs = {}
    for graphs in (False, True):
        llm = LLM(str(dirs["target"]), draft=draft, num_draft_tokens=K, device="cuda", dtype=torch.float32,
                  block_size=4, cuda_graphs=graphs, adaptive=False)
        assert (llm.engine.runner is not None) == graphs
        outs[graphs] = [o.token_ids for o in llm.generate(PROMPTS, params)]
        if graphs:
            assert any(step.graphs for step in llm.engine.runner._steps.values())
    assert outs[True] == outs[False]


def test_warm_up_times_every_step_and_writes_only_the_scratch_block(dirs):
    llm = make_llm(dirs, "near", static=True, adaptive=None)
    from specdec.speculation import AdaptiveSpeculation

    llm.engine.speculation = AdaptiveSpeculation(K)
    scratch = llm.blocks.num_blocks
    assert llm.warm_up([1, 3], ("greedy", "sample")) == 2 * 2 * (K + 1)  # buckets 1 and 4
    assert llm.engine.speculation.has_costs(1) and llm.engine.speculation.has_costs(3)
    assert not llm.engine.speculation.has_costs(5)
    for cache in (llm.cache, llm.drafter.cache):
        for t in (cache.k, cache.v):
            assert torch.isnan(t[:, :scratch]).all(), "warm-up wrote outside the scratch block"
            assert torch.isfinite(t[:, scratch]).all()
    # and serving afterwards is unaffected
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = make_llm(dirs, "near", static=False).generate(PROMPTS, params)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in want]
    with pytest.raises(ValueError, match="sampling mode"):
        llm.warm_up([1], ("beam",))
    with pytest.raises(ValueError, match="positive integers"):
        llm.warm_up([0])


@pytest.mark.gpu
def test_graph_step_makes_no_host_sync(dirs):
    """Between the staging copies and the engine's one device-to-host copy, a replayed
    step never waits for the device (torch raises on any synchronising call)."""
    llm = LLM(str(dirs["target"]), draft="early-exit:2", num_draft_tokens=K, device="cuda", dtype=torch.float32,
              block_size=4, cuda_graphs=True, adaptive=False)
    assert llm.warm_up([3], ("sample",)) == K + 1
    for seq in llm._make_sequences(PROMPTS, SamplingParams(temperature=1.0, max_tokens=20, seed=1)):
        llm.engine.add(seq)
    llm.engine.step()  # the prefill step (general path)
    seqs = list(llm.engine.running)
    assert llm.engine.runner.can_run(seqs, K)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = llm.engine.runner.run(seqs, llm.blocks, [K] * len(seqs), "sample")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.out.shape == (len(seqs), K + 1) and bool((result.n_accepted >= 0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("draft", [None, "early-exit:2", "near"])
def test_warm_up_with_default_modes_then_serving_captures_nothing_new(dirs, draft):
    """warm_up() with its default modes (greedy, sample) captures every step a batch of
    up to max_num_seqs needs, for each drafter the runner covers; serving then replays."""
    from specdec.speculation import bucket_of

    draft = str(dirs[draft]) if draft in dirs else draft
    llm = LLM(str(dirs["target"]), draft=draft, num_draft_tokens=K, device="cuda", block_size=4,
              max_num_seqs=4, adaptive=False)
    runner = llm.engine.runner
    ks = runner.max_k + 1
    assert llm.warm_up() == len({bucket_of(b) for b in range(1, 5)}) * 2 * ks
    assert all(step.graphs is not None for step in runner._steps.values())
    captured = set(runner._steps)
    for params in (SamplingParams(max_tokens=9, temperature=0), SamplingParams(max_tokens=9, temperature=1.0, seed=5)):
        outs = llm.generate(PROMPTS, params)
        assert all(len(o.token_ids) == 9 or o.finish_reason == "stop" for o in outs)
    assert set(runner._steps) == captured, "a step was captured while serving"
