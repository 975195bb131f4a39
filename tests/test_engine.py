"""The speculative engine end to end, on tiny random checkpoints of every family.

Oracle: plain greedy decoding with full no-cache forwards (``model(input_ids)``, matched
against transformers in test_models.py). Greedy speculative decoding must reproduce it
token for token whatever the drafter, the batch, the block size or the cache pressure.
Every KV cache is filled with NaN before use: reading a slot nobody wrote makes the
target's logits NaN and the step raises.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import string

import pytest
import torch
from torch.testing import assert_close

from checkpoints import FAMILIES, make_checkpoint, perturbed_copy
from engine_helpers import (
    PROMPTS,
    cached_model,
    draft_arg,
    greedy_ref,
    kv_at,
    poison_caches,
    random_prompts,
    record_running,
)
from specdec import LLM, CacheCapacityError, SamplingParams
from specdec.batch import build_forward_batch
from specdec.drafters.draft_model import ModelDrafter
from specdec.kernels import get_backend
from specdec.kv_cache import BlockManager, KVCache, cdiv

K = 4  # num_draft_tokens everywhere unless a test says otherwise
MAX_TOKENS = 16
# "draft-model": an unrelated random model (another cache shape, acceptance near 0);
# "near-draft": the target's weights plus 1% noise (acceptance ~60%); "self": the target
DRAFTERS = (None, "ngram", "early-exit:1", "early-exit:2", "draft-model", "near-draft", "self")


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    def mk(name, family="llama", **kw):
        return make_checkpoint(tmp_path_factory.mktemp(name), family, **kw)

    out = {f: mk(f, f) for f in FAMILIES}
    # a different random model of the same vocabulary, with a cache of another shape
    out["draft-model"] = mk("draft", "llama", num_layers=2, num_kv_heads=1, hidden_size=16,
                            intermediate_size=24, seed=1)
    out["small-vocab"] = mk("small_vocab", "llama", vocab_size=50, num_layers=1, seed=2)
    out["short-context"] = mk("short", "llama", max_position_embeddings=24, seed=3)
    for f in FAMILIES:
        out[f"near-{f}"] = perturbed_copy(out[f], tmp_path_factory.mktemp(f"near-{f}") / "ckpt",
                                          noise=0.01, seed=11)
    return out


def make_llm(path, draft=None, **kw):
    kw.setdefault("num_draft_tokens", K)
    llm = LLM(str(path), draft=draft, device="cpu", dtype=torch.float32, backend="torch", **kw)
    poison_caches(llm)
    return llm


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def check_metrics(out, k):
    m = out.metrics
    assert len(out.token_ids) == m.num_generated
    assert 0 <= m.num_accepted_tokens <= m.num_draft_tokens
    assert m.num_steps >= (1 if out.token_ids else 0)
    assert m.num_generated <= m.num_steps * (k + 1)
    # each step emits the accepted drafts plus one token (fewer only when it stops)
    assert m.num_generated >= m.num_accepted_tokens + m.num_steps - 1
    if m.num_steps:
        assert m.mean_accepted_length == pytest.approx(m.num_generated / m.num_steps)
    acc, prop = m.accepted_per_position, m.proposed_per_position
    assert len(acc) == len(prop) <= k and sum(prop) == m.num_draft_tokens
    assert all(a <= p for a, p in zip(acc, prop, strict=True))
    assert all(x >= y for x, y in zip(acc, acc[1:], strict=False))  # a chain: position i needs i - 1
    assert all(x >= y for x, y in zip(prop, prop[1:], strict=False))


def check_against_greedy(path, prompts, outs, max_tokens, eos=(2,)):
    for prompt, out in zip(prompts, outs, strict=True):
        ref = greedy_ref(path, prompt, max_tokens, eos)
        assert out.prompt_token_ids == prompt
        assert out.token_ids == ref
        stopped = len(ref) < max_tokens or (ref and ref[-1] in eos)
        assert out.finish_reason == ("stop" if stopped else "length")


def _prefill_kv(model, tokens, block_size=4):
    """K/V that one plain prefill of ``tokens`` writes into a fresh cache."""
    cfg, n = model.config, len(tokens)
    nb = cdiv(n, block_size)
    cache = KVCache(cfg.num_layers, nb, block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    bm = BlockManager(nb, block_size)
    bm.allocate(0, n)
    batch = build_forward_batch(bm, [0], [0], [n], [1], torch.tensor(tokens), "cpu")
    model.forward_cached(batch, cache, get_backend("torch"))
    return kv_at(cache, bm, 0, n)


def check_caches(llm, seq):
    """The target cache holds plain-prefill K/V at every committed position of ``seq``,
    and a separate draft cache likewise up to ``seq.draft_len``."""
    k, v = kv_at(llm.cache, llm.blocks, seq.seq_id, seq.target_len)
    ref_k, ref_v = _prefill_kv(llm.target, seq.tokens[:seq.target_len], llm.blocks.block_size)
    assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
    assert_close(v, ref_v, atol=1e-5, rtol=1e-5)
    d = llm.drafter
    if isinstance(d, ModelDrafter) and not d.shares_target_cache and seq.draft_len:
        assert seq.draft_len <= len(seq.tokens)
        k, v = kv_at(d.cache, llm.blocks, seq.seq_id, seq.draft_len)
        ref_k, ref_v = _prefill_kv(d.model, seq.tokens[:seq.draft_len], llm.blocks.block_size)
        assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
        assert_close(v, ref_v, atol=1e-5, rtol=1e-5)


def check_caches_every_step(llm):
    """Wrap ``llm.engine.step`` to run ``check_caches`` on every running sequence after it."""
    step = llm.engine.step
    checked = []

    def wrapped():
        finished = step()
        for seq in llm.engine.running:
            check_caches(llm, seq)
            checked.append(seq.seq_id)
        return finished

    llm.engine.step = wrapped
    return checked


# ---------------------------------------------------------------------- greedy identity


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculative_equals_plain_greedy(dirs, family, drafter):
    llm = make_llm(dirs[family], draft_arg(dirs, family, drafter), block_size=4)
    outs = llm.generate(PROMPTS, GREEDY)
    check_against_greedy(dirs[family], PROMPTS, outs, MAX_TOKENS)
    k = 0 if drafter is None else K
    for out in outs:
        check_metrics(out, k)
        if drafter is None:
            assert out.metrics.num_draft_tokens == 0 and out.metrics.num_steps == len(out.token_ids)
            assert out.metrics.num_draft_steps == 0 and out.metrics.accepted_length_per_draft_step == 0.0
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    totals = llm.metrics()
    assert totals["num_requests"] == len(PROMPTS)
    assert totals["num_generated_tokens"] == sum(len(o.token_ids) for o in outs)
    assert totals["num_steps"] == sum(o.metrics.num_steps for o in outs)
    assert totals["num_accepted_tokens"] == sum(o.metrics.num_accepted_tokens for o in outs)
    assert totals["num_draft_steps"] == sum(o.metrics.num_draft_steps for o in outs)
    if drafter == "ngram":
        assert totals["num_accepted_tokens"] > 0, "the repetitive prompt should get n-gram hits"


@pytest.mark.parametrize("drafter", [None, "near-draft", "early-exit:1"])
@pytest.mark.parametrize("family", ["qwen3", "qwen3-tied", "gemma2", "gemma3"])
def test_greedy_equals_transformers_generate(dirs, family, drafter):
    """Token for token what transformers' greedy ``generate`` produces (its EOS stop
    included), one prompt at a time so that it pads nothing."""
    from transformers import AutoModelForCausalLM

    path = dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    outs = make_llm(path, draft_arg(dirs, family, drafter), block_size=4).generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS,
                              eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_target_as_its_own_draft_accepts_everything(dirs, family):
    path = dirs[family]
    llm = make_llm(path, str(path), block_size=8)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == greedy_ref(path, prompt, MAX_TOKENS)
        m = out.metrics
        assert m.num_accepted_tokens == m.num_draft_tokens > 0
        assert m.acceptance_rate == 1.0
        # every step but the last emits k + 1 tokens; the last emits what is left
        assert m.num_steps == cdiv(MAX_TOKENS, K + 1)
        # drafts stop at max_tokens: a step with one token left proposes none
        assert m.proposed_per_position[0] == m.num_steps - (MAX_TOKENS % (K + 1) == 1)
        # a chain step that proposed anything proposed position 0; every draft was accepted
        assert m.num_draft_steps == m.proposed_per_position[0]
        assert m.accepted_length_per_draft_step == 1 + m.num_draft_tokens / m.num_draft_steps
    assert llm.metrics()["acceptance_rate_by_position"] == [1.0] * K
    exact = make_llm(path, str(path)).generate(
        PROMPTS[0], SamplingParams(max_tokens=3 * (K + 1), temperature=0, ignore_eos=True))[0]
    assert exact.metrics.mean_accepted_length == K + 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside Triton's interpreter
@pytest.mark.parametrize("family,drafter", [("qwen2", "ngram"), ("qwen2", "near-draft"),
                                             ("qwen3", "near-draft"), ("mistral-window", "near-draft"),
                                             ("gemma2", "near-draft"), ("gemma3", "near-draft")])
def test_greedy_identity_on_the_triton_backend(dirs, device, family, drafter):
    """The Triton kernels (the interpreter on CPU, native on CUDA) in the whole engine;
    qwen3's head norms go through the fused rotary kernel."""
    path = dirs[family]
    llm = LLM(str(path), draft=draft_arg(dirs, family, drafter), num_draft_tokens=K, device=device,
              dtype=torch.float32, backend="triton", block_size=16)
    assert llm.backend == "triton"
    poison_caches(llm)
    prompts = PROMPTS[1:]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    check_against_greedy(path, prompts, outs, 6)
    assert sum(o.metrics.num_accepted_tokens for o in outs) > 0
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


@pytest.mark.parametrize("k", [1, 2, 7])
def test_other_draft_lengths(dirs, k):
    path = dirs["llama"]
    for draft in ("early-exit:2", str(path)):
        outs = make_llm(path, draft, num_draft_tokens=k, block_size=4).generate(PROMPTS, GREEDY)
        check_against_greedy(path, PROMPTS, outs, MAX_TOKENS)
        for out in outs:
            check_metrics(out, k)


@pytest.mark.parametrize("drafter", [None, "early-exit:1", "draft-model", "near-draft"])
def test_block_size_one_and_odd(dirs, drafter):
    path = dirs["mistral"]
    for block_size in (1, 3):
        outs = make_llm(path, draft_arg(dirs, "mistral", drafter), block_size=block_size).generate(PROMPTS, GREEDY)
        check_against_greedy(path, PROMPTS, outs, MAX_TOKENS)


# ---------------------------------------------------------------------- scheduling


def _count_preemptions(llm):
    scheduler = llm.engine.scheduler
    calls, preempt = [], scheduler.preempt

    def wrapped(seq):
        calls.append(seq.seq_id)
        preempt(seq)

    scheduler.preempt = wrapped
    return calls


@pytest.mark.parametrize("drafter", [None, "ngram", "early-exit:1", "draft-model", "near-draft"])
def test_continuous_batching(dirs, drafter):
    path = dirs["llama"]
    prompts = random_prompts([3, 12, 1, 7, 5, 20], seed=4)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (4, 12, 2, 9, 16, 6)]
    llm = make_llm(path, draft_arg(dirs, "llama", drafter), block_size=4, max_num_seqs=2)
    running = record_running(llm)
    check_caches_every_step(llm)
    outs = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out.token_ids == greedy_ref(path, prompt, p.max_tokens, (2,))
    assert max(running) == 2 and running.count(2) >= 3
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def _budget(path, draft, block_size, num_blocks):
    """kv_cache_memory that buys exactly ``num_blocks`` blocks (target + draft model) plus
    the scratch block every cache keeps for padded rows."""
    per = 0
    for p in [path] + ([draft] if draft is not None and pathlib.Path(draft).is_dir() else []):
        c = cached_model(p).config
        per += KVCache.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, torch.float32)
    return (num_blocks + 1) * per


@pytest.mark.parametrize("drafter", [None, "ngram", "early-exit:2", "draft-model", "near-draft", "self"])
def test_preemption_under_a_tiny_cache(dirs, drafter):
    path, bs = dirs["qwen2"], 4
    prompts = random_prompts([6, 9, 2, 13], seed=5)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    k = 0 if drafter is None else K
    one = cdiv(max(map(len, prompts)) + MAX_TOKENS + k, bs)  # blocks the largest request needs
    draft = draft_arg(dirs, "qwen2", drafter)
    llm = make_llm(path, draft, block_size=bs, kv_cache_memory=_budget(path, draft, bs, one + 2))
    assert llm.blocks.num_blocks == one + 2
    preempted = _count_preemptions(llm)
    checked = check_caches_every_step(llm)  # re-admitted sequences recompute their caches
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == greedy_ref(path, prompt, MAX_TOKENS)
        assert out.finish_reason == "length"
        check_metrics(out, k)
    assert preempted, "the budget should force at least one preemption"
    assert set(preempted) <= set(checked)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_request_that_never_fits_raises_before_any_work(dirs):
    path, bs = dirs["llama"], 4
    llm = make_llm(path, "early-exit:1", block_size=bs, kv_cache_memory=_budget(path, None, bs, 5))
    assert llm.blocks.num_blocks == 5
    big = SamplingParams(max_tokens=24, temperature=0)  # 3 + 24 + 4 slots = 8 blocks
    with pytest.raises(CacheCapacityError, match=r"needs 8 KV blocks .* only 5"):
        llm.generate([[5, 6, 7], [8, 9]], [SamplingParams(max_tokens=2, temperature=0), big])
    assert not llm.engine.has_work()
    assert llm.blocks.num_free_blocks == 5
    assert llm.metrics()["num_steps"] == 0 and llm.metrics()["num_requests"] == 0
    # still serves requests that fit, several of them through the small cache
    prompts = [[5, 6, 7], [8, 9], [10]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    check_against_greedy(path, prompts, outs, 8)


# ---------------------------------------------------------------------- keep-path


@pytest.mark.parametrize("drafter", ["ngram", "early-exit:1", "draft-model", "near-draft", "self"])
def test_keep_path_cache_equals_plain_decoding(dirs, drafter):
    """After every step, the target cache at each committed position holds what plain
    decoding writes there (rejected drafts leave no trace); a draft model's own cache
    likewise up to ``draft_len``."""
    path = dirs["llama"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    spec = make_llm(path, draft_arg(dirs, "llama", drafter), block_size=4)
    seqs = spec._make_sequences(PROMPTS, params)
    for s in seqs:
        spec.engine.add(s)
    snapshots = []  # (prompt index, committed length, K, V) after each step
    for _ in range(4):  # at most 4 * (K + 1) = 20 < 24 tokens: nobody finishes
        spec.engine.step()
        for i, s in enumerate(seqs):
            assert not s.finished
            assert s.target_len == len(s.tokens) - 1  # everything but the pending token
            snapshots.append((i, s.target_len, *kv_at(spec.cache, spec.blocks, s.seq_id, s.target_len)))
            if drafter in ("draft-model", "near-draft", "self"):
                assert 0 < s.draft_len <= len(s.tokens)
            check_caches(spec, s)  # also the draft model's own cache, up to draft_len
    proposed = sum(s.metrics.num_draft_tokens for s in seqs)
    accepted = sum(s.metrics.num_accepted_tokens for s in seqs)
    if drafter == "self":
        assert accepted == proposed > 0
    elif drafter != "draft-model":
        assert proposed > accepted > 0, "want both accepted and rejected drafts"

    plain = make_llm(path, None, block_size=4)
    pseqs = plain._make_sequences(PROMPTS, params)
    for s in pseqs:
        plain.engine.add(s)
    while any(p.target_len < s.target_len for p, s in zip(pseqs, seqs, strict=True)):
        assert plain.engine.has_work()
        plain.engine.step()
    for p, s in zip(pseqs, seqs, strict=True):
        assert not p.finished
        assert p.tokens[:len(s.tokens)] == s.tokens  # greedy identity
    for i, n, k_spec, v_spec in snapshots:
        k_plain, v_plain = kv_at(plain.cache, plain.blocks, pseqs[i].seq_id, n)
        assert_close(k_spec, k_plain, atol=1e-5, rtol=1e-5)
        assert_close(v_spec, v_plain, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- stop conditions


@pytest.fixture(scope="module")
def eos_case(dirs, tmp_path_factory):
    """A copy of the llama checkpoint whose EOS is the token greedy decoding of PROMPTS[1]
    emits at its first fresh step >= 3; returns (path, eos, expected output)."""
    base = dirs["llama"]
    ref = greedy_ref(base, PROMPTS[1], MAX_TOKENS)  # default eos (2) ignored: not emitted here
    i = next(i for i in range(3, MAX_TOKENS) if ref[i] not in ref[:i] and ref[i] != 2)
    assert 2 not in ref[:i + 1], "fixture: the default EOS must not cut the reference short"
    path = shutil.copytree(base, tmp_path_factory.mktemp("eos") / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [50, ref[i]] if ref[i] != 50 else [51, ref[i]]
    (path / "config.json").write_text(json.dumps(cfg))
    return path, ref[i], ref


@pytest.mark.parametrize("drafter", [None, "ngram", "early-exit:1", "draft-model", "near-draft", "self"])
def test_eos_stops(dirs, eos_case, drafter):
    path, eos, ref = eos_case
    cut = ref.index(eos) + 1
    llm = make_llm(path, draft_arg(dirs, "llama", drafter) if drafter != "self" else str(path), block_size=4)
    assert eos in llm.config.eos_token_ids
    out, other = llm.generate([PROMPTS[1], PROMPTS[3]], GREEDY)
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
    assert out.metrics.num_generated == cut
    check_metrics(out, K)
    eos_ids = llm.config.eos_token_ids
    assert other.token_ids == greedy_ref(dirs["llama"], PROMPTS[3], MAX_TOKENS, eos_ids)
    # ignore_eos: the full length, EOS included in the middle
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


@pytest.mark.parametrize("drafter", [None, "self"])
def test_stop_token_ids(dirs, eos_case, drafter):
    path = dirs["llama"]
    _, tok, ref = eos_case  # the same target weights, default EOS
    cut = ref.index(tok) + 1
    llm = make_llm(path, draft_arg(dirs, "llama", drafter), block_size=4)
    for ignore_eos in (False, True):  # ignore_eos leaves stop_token_ids alone
        p = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=[96, tok], ignore_eos=ignore_eos)
        out = llm.generate(PROMPTS[1], p)[0]
        assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
        assert out.metrics.num_generated == cut


@pytest.mark.parametrize("drafter", [None, "ngram", "early-exit:1", "self"])
@pytest.mark.parametrize("max_tokens", [1, 2, K, K + 1, K + 2])
def test_max_tokens(dirs, drafter, max_tokens):
    path = dirs["mistral"]
    llm = make_llm(path, draft_arg(dirs, "mistral", drafter), block_size=4)
    p = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, p)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == greedy_ref(path, prompt, max_tokens)
        assert len(out.token_ids) == max_tokens and out.finish_reason == "length"
        check_metrics(out, 0 if drafter is None else K)
        if drafter == "self":  # every draft accepted; drafts never reach past max_tokens
            assert out.metrics.num_steps == cdiv(max_tokens, K + 1)
            left, drafts = max_tokens, 0
            while left:
                drafts += min(K, left - 1)
                left -= min(K, left - 1) + 1
            assert out.metrics.num_draft_tokens == out.metrics.num_accepted_tokens == drafts


def test_max_tokens_zero(dirs):
    path = dirs["llama"]
    llm = make_llm(path, "early-exit:1")
    params = [SamplingParams(max_tokens=0), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=0)]
    outs = llm.generate(PROMPTS[:3], params)
    for i in (0, 2):
        assert outs[i].token_ids == [] and outs[i].finish_reason == "length"
        assert outs[i].prompt_token_ids == PROMPTS[i]
        assert outs[i].metrics.num_steps == 0 and outs[i].metrics.num_generated == 0
    assert outs[1].token_ids == greedy_ref(path, PROMPTS[1], 5)
    assert llm.metrics()["num_generated_tokens"] == 5


def test_default_params(dirs):
    outs = make_llm(dirs["llama"], "ngram").generate([PROMPTS[0], PROMPTS[3]])  # SamplingParams()
    for out in outs:
        assert 1 <= len(out.token_ids) <= SamplingParams().max_tokens
        # unseeded: EOS (id 2 in these checkpoints) may come anywhere, the 16th token included
        assert out.finish_reason == ("stop" if out.token_ids[-1] == 2 else "length")
        assert out.finish_reason == "stop" or len(out.token_ids) == SamplingParams().max_tokens
        check_metrics(out, K)


@pytest.mark.parametrize("drafter", [None, "early-exit:2", "draft-model", "self"])
def test_stops_at_the_context_length(dirs, drafter):
    path = dirs["short-context"]  # max_position_embeddings = 24
    prompts = random_prompts([20, 23, 12], seed=6)
    llm = make_llm(path, draft_arg(dirs, "short-context", drafter), block_size=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        n = min(MAX_TOKENS, 24 - len(prompt))
        assert out.token_ids == greedy_ref(path, prompt, MAX_TOKENS, context=24)
        assert len(out.token_ids) == n and out.finish_reason == "length"
        if drafter == "self":  # all accepted, and no draft proposed past the context
            assert out.metrics.num_draft_tokens == out.metrics.num_accepted_tokens
            assert out.metrics.num_steps == cdiv(n, K + 1)
    # a prompt that fills the context exactly is fine with max_tokens=0
    out = llm.generate(random_prompts([24])[0], SamplingParams(max_tokens=0))[0]
    assert out.token_ids == [] and out.finish_reason == "length"


# -- stop strings, on a character-level tokenizer: token i >= 3 decodes to one character --

CHARS = string.ascii_letters + string.digits + string.punctuation  # 94 + 3 specials = 97


@pytest.fixture(scope="module")
def char_dir(dirs, tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    assert len(vocab) == 97
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    path = shutil.copytree(dirs["llama"], tmp_path_factory.mktemp("chars") / "ckpt")
    fast.save_pretrained(path)
    return path


def _text(ids):
    return "".join(CHARS[t - 3] for t in ids if t >= 3)


def _expected_stop(ref, stops):
    """Tokens up to the one that completes the first stop string, and the text cut before it."""
    for j in range(len(ref)):
        text = _text(ref[:j + 1])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return ref[:j + 1], text[:min(hits)]
    return ref, _text(ref)


@pytest.mark.parametrize("drafter", [None, "early-exit:1", "self"])
def test_stop_strings(dirs, char_dir, drafter):
    prompt = "Hello!"
    llm = make_llm(char_dir, drafter if drafter != "self" else str(char_dir), block_size=4)
    ids = [CHARS.index(c) + 3 for c in prompt]
    ref = greedy_ref(dirs["llama"], ids, 20)
    full = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert full.prompt_token_ids == ids and full.token_ids == ref
    assert full.text == _text(ref) and full.finish_reason == "length"
    text = _text(ref)
    cases = [
        [text[5:7]],                       # two characters, mid-output
        [text[9:12], text[6:8]],           # the earlier of two wins
        [text[0]],                         # the first character: empty text
        "never-in-output-" + "~" * 20,     # a str is one stop string; never matches
    ]
    for stops in cases:
        p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=stops)
        out = llm.generate(prompt, p)[0]
        want_ids, want_text = _expected_stop(ref, p.stop)
        assert out.token_ids == want_ids, stops
        assert out.text == want_text, stops
        assert out.finish_reason == ("stop" if len(want_ids) < 20 or want_text != text else "length")
        assert out.metrics.num_generated == len(out.token_ids)


def test_stop_strings_need_a_tokenizer(dirs):
    # no tokenizer: stop strings cannot be matched, so they are refused rather than ignored
    llm = make_llm(dirs["llama"])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0, stop="x"))
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out.token_ids == greedy_ref(dirs["llama"], PROMPTS[1], 6, (2,)) and out.text == ""


def test_a_tuple_of_ids_is_one_prompt(dirs):
    llm = make_llm(dirs["llama"])
    params = SamplingParams(max_tokens=4, temperature=0)
    (as_tuple,) = llm.generate(tuple(PROMPTS[1]), params)
    (as_list,) = llm.generate(list(PROMPTS[1]), params)
    assert as_tuple.token_ids == as_list.token_ids


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory):
    convert = pytest.importorskip("specdec.models.convert")
    from conftest import STORIES_DIR

    ckpt, tok = STORIES_DIR / "stories260K.bin", STORIES_DIR / "tok512.bin"
    if not (ckpt.is_file() and tok.is_file()):
        pytest.skip(f"stories260K not found at {STORIES_DIR}")
    return convert.convert_llama2c(ckpt, tok, tmp_path_factory.mktemp("stories"))


@pytest.mark.parametrize("drafter", [None, "early-exit:3"])
def test_stop_string_on_stories260k(stories_dir, drafter):
    llm = make_llm(stories_dir, drafter)
    full = llm.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0))[0]
    assert full.text.startswith(", there was a little girl named Lily.")
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0, stop=[" Lily", "park"]))[0]
    assert out.text == ", there was a little girl named"
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    assert "Lily" in llm.tokenizer.decode(out.token_ids) and len(out.token_ids) < len(full.token_ids)


# ---------------------------------------------------------------------- seeds


def test_llm_seed_makes_unseeded_requests_reproducible(dirs):
    path = dirs["llama"]
    p = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    a = make_llm(path, "ngram", seed=7).generate(PROMPTS, p)
    b = make_llm(path, "ngram", seed=7).generate(PROMPTS, p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    # and the seed matters: another LLM seed, or explicit request seeds, change the draws
    c = make_llm(path, "ngram", seed=8).generate(PROMPTS, p)
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    seeded = make_llm(path, "ngram").generate(
        [PROMPTS[3]] * 4, [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in (1, 1, 2, 3)])
    assert seeded[0].token_ids == seeded[1].token_ids
    assert len({tuple(o.token_ids) for o in seeded}) >= 3


# ---------------------------------------------------------------------- errors before any work


def _assert_idle(llm):
    assert not llm.engine.has_work()
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    assert llm.metrics()["num_steps"] == 0 and llm.metrics()["num_requests"] == 0


@pytest.fixture(scope="module")
def idle_llm(dirs):
    return make_llm(dirs["short-context"], "early-exit:1", block_size=4)


@pytest.mark.parametrize("prompts, params, exc, match", [
    ([[1, 2], []], None, ValueError, "prompt 1 is an empty token list"),
    ("", None, ValueError, "prompt 0 is empty"),
    ([], None, ValueError, "non-empty"),
    (5, None, ValueError, "prompts must be"),
    ([[1, 2, -1]], None, ValueError, r"\[-1\].*\[0, 97\)"),
    ([[1, 97]], None, ValueError, r"\[97\].*\[0, 97\)"),
    ([[1, 2], [3, True]], None, ValueError, "prompt 1 has token id"),
    ([[1, 2.0]], None, ValueError, "prompt 0 has token id"),
    ([[1], "text"], None, ValueError, "no tokenizer"),
    ([[1], 3], None, TypeError, "prompt 1 is a int"),
    ([[1], [2], [3]], [SamplingParams()] * 2, ValueError, "got 2 SamplingParams for 3 prompts"),
    ([[1], [2]], [SamplingParams(), {"max_tokens": 3}], TypeError, "params\\[1\\] is a dict"),
    ([[1, 2], [5] * 30], None, ValueError, "prompt 1 has 30 tokens but the model's context is 24"),
    ([[5] * 24], SamplingParams(max_tokens=1), ValueError, "24 tokens but the model's context is 24"),
])
def test_generate_errors_before_any_work(idle_llm, prompts, params, exc, match):
    with pytest.raises(exc, match=match):
        idle_llm.generate(prompts, params)
    _assert_idle(idle_llm)


def test_llm_serves_after_errors(dirs, idle_llm):
    with pytest.raises(ValueError):
        idle_llm.generate([[1, 2, 3], [-5]], SamplingParams(max_tokens=3))
    _assert_idle(idle_llm)
    out = idle_llm.generate([[4, 5, 6]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == greedy_ref(dirs["short-context"], [4, 5, 6], 5)
    assert out.request_id == 0  # the failed call consumed no request ids


@pytest.mark.parametrize("draft, match", [
    ("medusa", r"'medusa' is not a known drafter.*ngram.*early-exit"),
    ("early-exit:x", "layer count"),
    ("early-exit:-1", "layer count"),
    ("early-exit:", "layer count"),
    ("early-exit:0", r"early-exit:0 needs 1 <= N <= 2 \(the target has 3 layers\)"),
    ("early-exit:3", r"early-exit:3 needs 1 <= N <= 2"),
    ("early-exit:99", r"1 <= N <= 2"),
])
def test_bad_drafter_names(dirs, draft, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(dirs["llama"]), draft=draft, device="cpu")


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "4"])
def test_bad_num_draft_tokens(dirs, k):
    with pytest.raises(ValueError, match="num_draft_tokens"):
        LLM(str(dirs["llama"]), draft="ngram", num_draft_tokens=k, device="cpu")


def test_draft_model_with_another_vocabulary(dirs):
    with pytest.raises(ValueError, match="vocabulary") as e:
        LLM(str(dirs["llama"]), draft=str(dirs["small-vocab"]), device="cpu")
    assert "50" in str(e.value) and "97" in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="cuda"), "backend"),
    (dict(block_size=0), "block_size"),
    (dict(max_num_seqs=0), "max_num_seqs"),
])
def test_bad_llm_options(dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(dirs["llama"]), device="cpu", **kwargs)
