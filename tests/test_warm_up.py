"""warm_up compiles every attention variant a served step can choose, and the eager
path's other kernels, ahead of the first request.

On a GPU each launch compiles once per variant (tests/test_gpu_compile.py checks that
batch size and split count make no new variant); here the policy is asked, on a pretend
GPU, which configs eager and graph steps can pick over a sweep of shapes, and
``verify_attention.precompile`` must launch each of them. The warm-up's pieces also run
on the interpreter, so a changed launcher signature breaks this test, not a GPU run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch

from checkpoints import make_checkpoint
from specdec import LLM, warmup
from specdec.cuda_graphs import SAMPLING_MODES

va = importlib.import_module("specdec.kernels.verify_attention")
policy = importlib.import_module("specdec.kernels._attention_policy")


def _variant(cfg, tree):
    return dataclasses.replace(cfg, num_splits=1), cfg.num_splits > 1, tree


@pytest.mark.parametrize("arch,sms", [(90, 132), (80, 108)])
@pytest.mark.parametrize("dtype,h,h_kv,d", [
    (torch.bfloat16, 32, 8, 128), (torch.bfloat16, 32, 8, 64), (torch.float16, 16, 4, 256),
    (torch.float32, 4, 2, 16),
], ids=["8B", "1B", "d256", "tiny-fp32"])
def test_precompile_launches_every_variant_the_policy_picks(monkeypatch, arch, sms, dtype, h, h_kv, d):
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "gpu_of_device", lambda device: policy.Gpu(sms, arch))
    launched = set()
    monkeypatch.setattr(va, "_launch_attention", lambda *a, **kw: launched.add(_variant(a[-1], a[6] is not None)))
    cache = torch.zeros(4, 16, h_kv, d, dtype=dtype)
    assert va.precompile(cache, cache, h, scratch_block=3) == len(launched)
    group = h // h_kv
    picked = set()
    for B in (1, 2, 3, 8, 16, 33, 64, 128):
        for n in (1, 2, 4, 5, 8, 9, 16, 17, 33, 64, 100, 500, 2048):
            for seq_len in (n, n + 15, n + 300, n + 4096, n + 131072, None):
                cfg = policy.pick_config(B, h_kv, group, d, n, seq_len, dtype, torch.device("cuda"))
                picked.add(_variant(cfg, False))
                if n <= 64:
                    picked.add(_variant(cfg, True))
    missing = picked - launched
    assert not missing, f"warm-up misses {missing}"


on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="interprets the kernels on CPU")


@on_cpu
def test_precompile_on_the_interpreter_reads_only_the_scratch_block():
    k = torch.full((3, 4, 2, 16), float("nan"))
    v = torch.full((3, 4, 2, 16), float("nan"))
    k[1], v[1] = 0.5, 0.25  # the scratch block
    before = (k.clone(), v.clone())
    assert va.precompile(k, v, 4, scratch_block=1) == 4  # 1 config x split or not x tree or not
    torch.testing.assert_close(k, before[0], equal_nan=True)
    torch.testing.assert_close(v, before[1], equal_nan=True)
    # a sliding-window model's kinds: each a variant of its own (window and cap are runtime values)
    assert va.precompile(k, v, 4, scratch_block=1, kinds=((None, None), (3, None), (5, 50.0))) == 12
    torch.testing.assert_close(k, before[0], equal_nan=True)
    with pytest.raises(ValueError, match="sliding_window must be None or an integer >= 1"):
        va.precompile(k, v, 4, scratch_block=1, kinds=((0, None),))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("warm") / "target", num_layers=2, seed=0)


@on_cpu
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter
def test_eager_warm_up_pieces_run_with_todays_launchers(target):
    # CPU: warm_up_eager itself compiles nothing (returns 0); its pieces run on the
    # interpreter against the real launchers, the tree sampler and keep-path included
    llm = LLM(str(target), draft="early-exit:1", num_draft_tokens=3, device="cpu", dtype=torch.float32,
              backend="triton", block_size=4, seed=0, draft_tree=(2, 1))
    engine = llm.engine
    assert warmup.warm_up_eager(engine, SAMPLING_MODES, [2]) == 0
    scratch = engine.blocks.num_blocks
    assert warmup._one_token_forward(engine.target, engine.cache, engine.ops, scratch, None) == 1
    assert torch.isfinite(engine.cache.k[:, scratch]).all()
    n = warmup._sampler_warm_up(engine, SAMPLING_MODES, trees=True, batch_sizes=[2])
    # per mode at batch 2: the rejection sampler at every k, the draft sampler at k >= 1,
    # the tree sampler at every depth and its draft sampler
    d = engine.draft_depth
    assert n == len(SAMPLING_MODES) * ((d + 1) + d + (d + 1))


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter
def test_warm_up_runs_an_eagle3_heads_own_forward(target, tmp_path):
    """An EAGLE-3 drafter hands warm-up its head (``own_forwards``): attention of the head's
    shape precompiles on its cache, and one head forward runs on the Triton launchers."""
    from eagle3_reference import make_eagle3_head

    vocab, hidden = (json.loads((target / "config.json").read_text())[key] for key in ("vocab_size", "hidden_size"))
    head = make_eagle3_head(tmp_path / "head", vocab_size=vocab, target_hidden=hidden, aux_ids=[0, 1], seed=2)
    llm = LLM(str(target), draft=str(head), num_draft_tokens=2, device="cpu", dtype=torch.float32,
              backend="triton", block_size=4, seed=0)
    engine, scratch = llm.engine, llm.cache.scratch_block
    (model, cache, num_layers), = llm.drafter.own_forwards()
    assert cache is llm.drafter.cache and model.attention_kinds() == ((None, None),)
    k_cache, v_cache = cache.layer(0)
    assert va.precompile(k_cache, v_cache, model.config.num_heads, scratch, trees=False) >= 1
    cache.k.fill_(float("nan"))
    assert warmup._one_token_forward(model, cache, engine.ops, scratch, num_layers) == 1
    assert torch.isfinite(cache.k[:, scratch, 0]).all()  # the head wrote its one slot
    assert llm.drafter.samples_q  # so the draft sampler is warmed up too
