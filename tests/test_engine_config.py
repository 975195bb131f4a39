"""EngineConfig, the drafter spec and factory, and KV-cache sizing: the pieces ``LLM`` runs."""

import doctest
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import specdec.drafters.factory as factory
from checkpoints import make_checkpoint
from specdec import LLM
from specdec.config import EngineConfig
from specdec.drafters.base import Drafter
from specdec.drafters.draft_model import ModelDrafter
from specdec.drafters.factory import DrafterSpec, build_drafter, draft_cache_config
from specdec.drafters.ngram import NgramDrafter
from specdec.kernels import get_backend
from specdec.kv_cache import KVCache, allocate_caches
from specdec.models import load_model

MISSING = "/nonexistent/target"  # EngineConfig never reads the target: checks come before loading


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    mk = tmp_path_factory.mktemp
    return {
        "target": make_checkpoint(mk("target"), num_layers=3, max_position_embeddings=32),
        "draft": make_checkpoint(mk("draft"), num_layers=2, num_kv_heads=1, hidden_size=16,
                                 intermediate_size=24, seed=1),
        "small-vocab": make_checkpoint(mk("small_vocab"), vocab_size=50, num_layers=1, seed=2),
    }


# ---------------------------------------------------------------------- EngineConfig


def test_cpu_defaults_are_resolved():
    cfg = EngineConfig(MISSING, device="cpu")
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32 and cfg.backend == "torch"
    assert cfg.cuda_graphs is False and cfg.adaptive is False
    assert cfg.drafter == DrafterSpec("none", "none") and cfg.draft_slots == 0


def test_draft_slots_are_the_chain_or_the_tree():
    assert EngineConfig(MISSING, "ngram", num_draft_tokens=5, device="cpu").draft_slots == 5
    tree = EngineConfig(MISSING, "early-exit:1", num_draft_tokens=5, device="cpu", draft_tree=(3, 2))
    assert tree.draft_slots == 3 + 3 * 2 and tree.drafter.draft_depth == 2
    assert tree.drafter.tree.branching == (3, 2) and not tree.drafter.fixed_shape


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_draft_tokens=0), ValueError, "num_draft_tokens must be an integer >= 1"),
    (dict(num_draft_tokens=2.0), ValueError, "num_draft_tokens"),
    (dict(backend="cuda"), ValueError, "backend must be one of 'auto'"),
    (dict(block_size=0), ValueError, "block_size and max_num_seqs must be integers >= 1"),
    (dict(block_size="16"), ValueError, "block_size"),
    (dict(max_num_seqs=2.5), ValueError, "max_num_seqs"),
    (dict(kv_cache_memory=-1), ValueError, "kv_cache_memory must be a number of bytes > 0"),
    (dict(kv_cache_memory=True), ValueError, "kv_cache_memory"),
    (dict(seed=-3), ValueError, "seed must be None or an integer >= 0"),
    (dict(dtype=torch.int8), TypeError, "dtype must be torch.float32, float16 or bfloat16"),
    (dict(draft="medusa"), ValueError, "'medusa' is not a known drafter nor an existing path"),
    (dict(draft="early-exit:two"), ValueError, "needs a layer count"),
    (dict(draft_tree=(2, 0), draft="ngram"), ValueError, "draft_tree must be a non-empty tuple"),
    (dict(draft_tree=(2, 1)), ValueError, "draft_tree needs a drafter"),
    (dict(adaptive="yes", draft="ngram"), TypeError, "adaptive must be True, False or None"),
    (dict(cuda_graphs=0), TypeError, "cuda_graphs must be True, False or None"),
    (dict(cuda_graphs=True, draft="early-exit:1"), ValueError, "needs a CUDA device and the Triton backend"),
    (dict(adaptive=True), ValueError, "it needs a drafter and no draft_tree"),
    (dict(adaptive=True, draft="ngram", draft_tree=(2,)), ValueError, "it needs a drafter and no draft_tree"),
])
def test_bad_options_raise_before_anything_is_read(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EngineConfig(MISSING, **{"device": "cpu", **kwargs})
    with pytest.raises(exc, match=match):  # LLM checks them before it looks for the model
        LLM(MISSING, **{"device": "cpu", **kwargs})


def test_graph_coverage_is_checked_on_the_drafter(monkeypatch):
    """Where graphs are possible (faked: CUDA present, Triton backend), n-gram drafts and
    trees still refuse cuda_graphs=True, and the default turns them on only for the rest."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for kwargs in (dict(draft="ngram"), dict(draft="early-exit:1", draft_tree=(2,))):
        with pytest.raises(ValueError, match="does not cover the n-gram drafter or draft trees"):
            EngineConfig(MISSING, device="cuda", backend="triton", cuda_graphs=True, **kwargs)
        assert EngineConfig(MISSING, device="cuda", backend="triton", **kwargs).cuda_graphs is False
    chain = EngineConfig(MISSING, "early-exit:1", device="cuda")
    assert (chain.backend, chain.dtype, chain.cuda_graphs, chain.adaptive) == ("triton", torch.bfloat16, True, True)
    plain = EngineConfig(MISSING, device="cuda")
    assert plain.cuda_graphs is True and plain.adaptive is False  # nothing to adapt without a drafter


# ---------------------------------------------------------------------- DrafterSpec


def test_spec_of_each_name(tmp_path):
    assert DrafterSpec.parse(None) == DrafterSpec("none", "none")
    assert DrafterSpec.parse("ngram", [2, 1]).tree.branching == (2, 1)
    ee = DrafterSpec.parse("early-exit:02")
    assert (ee.kind, ee.name, ee.num_layers, ee.fixed_shape) == ("early-exit", "early-exit:2", 2, True)
    (tmp_path / "config.json").write_text("{}")
    spec = DrafterSpec.parse(tmp_path)
    assert (spec.kind, spec.path, spec.name) == ("model", tmp_path, str(tmp_path))


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a model directory.*'ngram'"):
        DrafterSpec.parse(str(tmp_path))
    with pytest.raises(ValueError, match="not a known drafter"):
        DrafterSpec.parse(tmp_path / "absent")
    with pytest.raises(ValueError, match="not a known drafter"):
        DrafterSpec.parse(3)


def test_factory_docstring_examples():
    result = doctest.testmod(factory)
    assert result.attempted > 0 and result.failed == 0


def test_early_exit_depth_is_checked_against_the_target():
    target = SimpleNamespace(num_layers=3, vocab_size=97)
    assert draft_cache_config(DrafterSpec.parse("early-exit:2"), "t", target) is None
    for n in (0, 3):
        with pytest.raises(ValueError, match=rf"early-exit:{n} needs 1 <= N <= 2 \(the target has 3 layers\)"):
            draft_cache_config(DrafterSpec.parse(f"early-exit:{n}"), "t", target)


def test_draft_model_config_and_vocabulary(dirs):
    target = load_model(dirs["target"]).config
    cfg = draft_cache_config(DrafterSpec.parse(dirs["draft"]), dirs["target"], target)
    assert (cfg.num_layers, cfg.num_kv_heads) == (2, 1)
    with pytest.raises(ValueError, match="vocabulary of 50 tokens but the target .* has 97"):
        draft_cache_config(DrafterSpec.parse(str(dirs["small-vocab"])), dirs["target"], target)


# ---------------------------------------------------------------------- build_drafter


def test_build_each_kind(dirs):
    target = load_model(dirs["target"])
    draft_cfg = draft_cache_config(DrafterSpec.parse(dirs["draft"]), dirs["target"], target.config)
    blocks, (cache, draft_cache) = allocate_caches([target.config, draft_cfg], None, 4, 2, 3,
                                                   torch.float32, "cpu")
    ops = get_backend("torch")

    def build(draft, tree=None, own=None):
        return build_drafter(DrafterSpec.parse(draft, tree), target, cache, own, blocks, ops,
                             torch.device("cpu"), torch.float32)

    none = build(None)
    assert type(none) is Drafter and none.name == "none"
    ngram = build("ngram", (2,))
    assert isinstance(ngram, NgramDrafter) and ngram.tree.branching == (2,)
    ee = build("early-exit:2")
    assert isinstance(ee, ModelDrafter) and ee.model is target and ee.cache is cache
    assert ee.shares_target_cache and ee.num_layers == 2 and ee.name == "early-exit:2"
    dm = build(str(dirs["draft"]), own=draft_cache)
    assert isinstance(dm, ModelDrafter) and dm.cache is draft_cache and not dm.shares_target_cache
    assert dm.model.config.num_layers == 2 and dm.name == str(dirs["draft"]) and dm.num_layers is None
    with pytest.raises(ValueError, match="needs a KV cache of its own"):
        build(str(dirs["draft"]))


# ---------------------------------------------------------------------- KV sizing


def _layout(layers, kv_heads, head_dim, context=64):
    return SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                           max_position_embeddings=context)


def test_budget_sizes_blocks_with_one_scratch_block():
    target, draft = _layout(3, 2, 8), _layout(1, 1, 4)
    per = KVCache.bytes_per_block(3, 4, 2, 8, torch.float32) + KVCache.bytes_per_block(1, 4, 1, 4, torch.float32)
    blocks, caches = allocate_caches([target, draft], 6 * per + per - 1, 4, 100, 2, torch.float32, "cpu")
    assert blocks.num_blocks == 5 and [c.num_blocks for c in caches] == [6, 6]
    assert caches[0].k.shape == (3, 6, 4, 2, 8) and caches[1].k.shape == (1, 6, 4, 1, 4)
    assert all(c.scratch_block == 5 for c in caches)
    blocks.allocate(0, 5 * 4)  # every block the manager owns: never the scratch block
    assert 5 not in blocks.table(0) and blocks.num_free_blocks == 0


def test_budget_is_capped_by_full_context_sequences():
    # 3 sequences of 64 + 2 tokens in blocks of 4: 3 * 17 = 51 blocks, whatever the budget
    blocks, (cache,) = allocate_caches([_layout(1, 1, 4)], 1e9, 4, 3, 2, torch.float32, "cpu")
    assert blocks.num_blocks == 51 and cache.num_blocks == 52
    blocks, _ = allocate_caches([_layout(1, 1, 4)], None, 4, 3, 2, torch.float32, "cpu")  # 1 GiB on CPU
    assert blocks.num_blocks == 51


def test_a_budget_under_two_blocks_is_refused():
    per = KVCache.bytes_per_block(1, 4, 1, 4, torch.float32)
    with pytest.raises(ValueError, match=f"kv_cache_memory={2 * per - 1} bytes holds fewer than two KV blocks"):
        allocate_caches([_layout(1, 1, 4)], 2 * per - 1, 4, 3, 2, torch.float32, "cpu")
    blocks, _ = allocate_caches([_layout(1, 1, 4)], 2 * per, 4, 3, 2, torch.float32, "cpu")
    assert blocks.num_blocks == 1


# ---------------------------------------------------------------------- LLM wiring


def test_llm_wires_config_caches_drafter_and_runner(dirs):
    llm = LLM(str(dirs["target"]), draft=Path(dirs["draft"]), num_draft_tokens=3, device="cpu",
              block_size=4, max_num_seqs=2)
    assert llm.engine_config.drafter.kind == "model" and llm.engine.num_draft_tokens == 3
    assert llm.engine.runner is None  # no CUDA graphs on the CPU
    # 2 sequences of 32 + 3 tokens in blocks of 4, and the scratch block in both caches
    assert llm.blocks.num_blocks == 2 * 9 and llm.cache.num_blocks == llm.drafter.cache.num_blocks == 19
    assert llm.decode_runner(use_graphs=False).scratch_block == llm.cache.scratch_block == llm.blocks.num_blocks
    out = llm.generate([[5, 6, 7]], None)[0]
    assert out.finish_reason in ("length", "stop") and llm.blocks.num_free_blocks == llm.blocks.num_blocks
