"""One ``LLM``, many callers: isolation of failures, cancellation, interleaved streams,
sentencepiece text, accepted parameter ranges, and the small user-facing contracts.

One test per defect of the issue (each fails on the code before its fix), then a
randomized interleaving of streams, handles and generate calls with injected failures.
Everything runs on tiny random checkpoints with the torch backend. The tokenizer is a
sentencepiece-style one built here: every piece is a word "▁c" (so decoding the output
ids alone drops the first token's space), plus two byte pieces that make "é".
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import string
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from engine_helpers import ScheduledK
from specdec import LLM, NonFiniteLogitsError, SamplingParams
from specdec.cli import main
from specdec.detokenize import TextStream
from specdec.drafters.ngram import NgramDrafter
from specdec.sampling_params import MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, MIN_TOP_P
from specdec.sequence import Sequence

SPACE = "\u2581"
WORDS = (string.ascii_letters + string.digits + string.punctuation)[:92]  # ids 3 .. 94
BYTE_C3, BYTE_A9 = 95, 96  # "é" = <0xC3> <0xA9>
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", max_position_embeddings=128)


@pytest.fixture(scope="module")
def sp_dir(tiny, tmp_path_factory):
    """The tiny checkpoint with a sentencepiece-style tokenizer (decode only)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{SPACE + c: i + 3 for i, c in enumerate(WORDS)},
             "<0xC3>": BYTE_C3, "<0xA9>": BYTE_A9}
    assert len(vocab) == 97
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)
    path = shutil.copytree(tiny, tmp_path_factory.mktemp("sp") / "ckpt")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("draft"), "llama", num_layers=1, hidden_size=16,
                           num_kv_heads=1, intermediate_size=24, max_position_embeddings=128, seed=1)


def make(path, draft=None, **kw):
    return LLM(str(path), draft=draft, device="cpu", dtype=torch.float32, backend="torch", **kw)


def assert_idle(llm):
    assert not llm.engine.has_work()
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def fail_when(llm, predicate, exc=RuntimeError):
    """Make the chain verify raise ``exc`` (after the target forward wrote the caches)
    whenever ``predicate(seqs)`` holds for the sequences of the step."""
    eager = llm.engine.eager
    real = eager.verify_chain

    def verify(seqs, blocks, draft, sampling):
        out = real(seqs, blocks, draft, sampling)
        if predicate(seqs):
            raise exc("injected failure")
        return out

    eager.verify_chain = verify


def guard_steps(llm, limit=500):
    """Turn a caller that would step an idle engine forever into a test failure."""
    real, calls = llm.engine.step, [0]

    def step():
        calls[0] += 1
        assert calls[0] < limit, "the caller keeps stepping without progress"
        return real()

    llm.engine.step = step


# ---------------------------------------------------------------------- 1. failed steps


def test_interrupted_generate_leaves_nothing_behind(sp_dir):
    llm = make(sp_dir, "early-exit:1")
    calls = [0]

    def third_step(seqs):
        calls[0] += 1
        return calls[0] == 3

    fail_when(llm, third_step, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert_idle(llm)
    steps = llm.metrics()["num_steps"]
    (out,) = llm.generate([[8, 9]], SamplingParams(max_tokens=1, temperature=0))
    assert len(out.token_ids) == 1 and llm.metrics()["num_steps"] == steps + 1  # nothing old ran


def test_a_failing_request_fails_alone_and_the_instance_keeps_serving(sp_dir):
    llm = make(sp_dir, "early-exit:1")
    solo = make(sp_dir, "early-exit:1").generate([[6, 7, 8]], GREEDY)[0].token_ids
    fail_when(llm, lambda seqs: any(s.tokens[0] == 3 for s in seqs))
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate([[3, 4, 5], [6, 7, 8]], GREEDY)
    assert_idle(llm)
    for _ in range(2):  # and again: nothing of the failed call is re-run
        assert llm.generate([[6, 7, 8]], GREEDY)[0].token_ids == solo
    # with handles: the failing request ends with reason 'error', its batch mate is untouched
    bad, good = llm.submit([3, 4, 5], GREEDY), llm.submit([6, 7, 8], GREEDY)
    while llm.has_work():
        llm.step()
    assert bad.finish_reason == "error" and isinstance(bad.error, RuntimeError)
    assert bad.output().error is bad.error
    assert good.finish_reason == "length" and good.token_ids == solo
    assert_idle(llm)


# ---------------------------------------------------------------------- 2. parameter ranges


@pytest.mark.parametrize("field, value", [
    ("temperature", 1e-38), ("temperature", MIN_TEMPERATURE / 2), ("temperature", 1e300),
    ("top_p", 1e-50), ("top_p", MIN_TOP_P / 2),
    ("top_k", 2**31), ("top_k", 2**63),
])
def test_values_the_samplers_cannot_take_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_extreme_accepted_values_sample_valid_tokens(sp_dir):
    llm = make(sp_dir)
    greedy = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    params = [SamplingParams(max_tokens=6, temperature=MIN_TEMPERATURE, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=6, top_p=MIN_TOP_P, seed=2, ignore_eos=True),
              SamplingParams(max_tokens=6, top_k=MAX_TOP_K, top_p=0.5, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=MAX_TEMPERATURE, top_k=5, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=6, top_p=1 - 1e-12, seed=5, ignore_eos=True)]
    assert params[-1].top_p == 1.0  # rounds to 1 in float32: stored as exactly "disabled"
    outs = llm.generate([[5, 6, 7]] * len(params), params)
    for out in outs:
        assert len(out.token_ids) == 6 and all(0 <= t < 97 for t in out.token_ids)
    # the tiniest temperature and top_p keep only the most likely token: greedy
    assert outs[0].token_ids == outs[1].token_ids == greedy.token_ids


def test_the_engine_never_appends_an_invalid_token(sp_dir):
    llm = make(sp_dir)
    real = llm.engine.ops.rejection_sample

    def first_row_invalid(*args, **kwargs):
        out, n_acc = real(*args, **kwargs)
        out[0] = -1
        return out, n_acc

    llm.engine.ops = dataclasses.replace(llm.engine.ops, rejection_sample=first_row_invalid)
    bad, good = llm.submit([5, 6], GREEDY), llm.submit([7, 8], GREEDY)
    while llm.has_work():
        llm.step()
    assert bad.finish_reason == "error" and "outside the vocabulary" in str(bad.error)
    assert bad.token_ids == [] and -1 not in good.token_ids
    assert_idle(llm)


# ---------------------------------------------------------------------- 3, 4. paused streams


def test_paused_stream_survives_another_calls_nan_error(sp_dir, tmp_path):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompt = [10, 11, 12]
    solo = make(sp_dir).generate([prompt], params)[0]
    nan_id = next(t for t in range(3, 95) if t not in prompt + solo.token_ids)
    poisoned = shutil.copytree(sp_dir, tmp_path / "poisoned")
    weights = load_file(poisoned / "model.safetensors")
    weights["model.embed_tokens.weight"][nan_id] = float("nan")
    save_file(weights, poisoned / "model.safetensors")

    llm = make(poisoned)
    guard_steps(llm)
    stream = llm.stream(prompt, params)
    first = next(stream)
    with pytest.raises(NonFiniteLogitsError, match=f"request {llm._next_id} at step 0"):
        llm.generate([[nan_id, 5], [6, 7]], params)
    assert first + "".join(stream) == solo.text
    # a paused stream whose request is aborted by someone else ends (it does not hang)
    stream = llm.stream(prompt, params)
    next(stream)
    llm.engine.abort_all()
    list(stream)
    assert_idle(llm)


def test_paused_streams_get_their_full_text_whoever_finishes_them(sp_dir):
    llm = make(sp_dir, "early-exit:1")
    solo = make(sp_dir, "early-exit:1")
    pa = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    pb = SamplingParams(max_tokens=14, temperature=0.9, seed=4, ignore_eos=True)
    want_a, want_b = solo.generate([[10, 11]], pa)[0].text, solo.generate([[12, 13, 14]], pb)[0].text
    a, b = llm.stream([10, 11], pa), llm.stream([12, 13, 14], pb)
    got_a, got_b = next(a), next(b)
    llm.generate([[20, 21]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))  # finishes both
    got_b += "".join(b)
    got_a += "".join(a)
    assert (got_a, got_b) == (want_a, want_b)
    assert_idle(llm)


# ---------------------------------------------------------------------- 5. sentencepiece text


def test_first_output_token_keeps_its_leading_space(sp_dir):
    llm = make(sp_dir)
    tok, prompt = llm.tokenizer, [5, 6, 7]
    out = llm.generate([prompt], GREEDY)[0]
    head, full = tok.decode(prompt), tok.decode(prompt + out.token_ids)
    assert out.text == full[len(head):] and out.text.startswith(" ")
    assert "".join(llm.stream(prompt, GREEDY)) == out.text
    # a stop string that starts with that space matches at the first token
    first_word = " " + out.text.split()[0]
    stopped = llm.generate([prompt], dataclasses.replace(GREEDY, stop=(first_word,)))[0]
    assert stopped.token_ids == out.token_ids[:1] and stopped.text == "" and stopped.finish_reason == "stop"


# ---------------------------------------------------------------------- 6. trees and seeds


def test_tree_drafts_keep_seeded_batch_invariance(tiny):
    llm = make(tiny, "early-exit:1", draft_tree=(2, 1))
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s, ignore_eos=True) for s in range(12)]
    alone = [llm.generate([[5, 6, 7]], p)[0].token_ids for p in params]
    longer = SamplingParams(max_tokens=8, temperature=1.0, seed=99, ignore_eos=True)
    batch = llm.generate([[5, 6, 7]] * len(params) + [[9, 9, 9]], params + [longer])
    assert [o.token_ids for o in batch[:-1]] == alone


# ---------------------------------------------------------------------- 7. fixed-shape step


@pytest.mark.parametrize("max_tokens, ks", [(1, None), (6, [0, 3])])  # ks: the adaptive k of each step
def test_fixed_shape_step_with_a_one_token_prompt_and_a_draft_model(tiny, draft_dir, max_tokens, ks):
    """A step that drafts nothing (max_tokens=1, or an adaptive k of 0) on one-token prompts."""
    llm = make(tiny, str(draft_dir), num_draft_tokens=3)
    llm.engine.runner = llm.decode_runner(use_graphs=False)
    if ks is not None:
        llm.engine.speculation = ScheduledK(ks * 6)
    p = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in make(tiny).generate([[5], [6]], p)]
    assert [o.token_ids for o in llm.generate([[5], [6]], p)] == want


# ---------------------------------------------------------------------- 8. tokens/s


def test_tokens_per_second_counts_engine_time_only(sp_dir):
    llm = make(sp_dir)
    paused = 0.0
    for _ in llm.stream([5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)):
        time.sleep(0.05)  # the consumer's time between pieces
        paused += 0.05
    m = llm.metrics()
    assert m["num_generated_tokens"] == 10
    assert m["tokens_per_second"] > 2 * 10 / paused
    assert m["tokens_per_second"] == pytest.approx(10 / llm.engine.busy_seconds)


# ---------------------------------------------------------------------- 9. small contracts


def test_sampling_params_inputs_of_other_types():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos="no")
    p = SamplingParams(stop=None, stop_token_ids=None, max_tokens=np.int64(5), top_k=np.int32(3),
                       temperature=np.float32(0.5), seed=np.uint64(7), ignore_eos=np.bool_(True))
    assert (p.stop, p.stop_token_ids, p.max_tokens, p.top_k, p.seed, p.ignore_eos) == ((), (), 5, 3, 7, True)
    assert type(p.max_tokens) is int and type(p.temperature) is float and p.ignore_eos is True


def test_numpy_token_ids_are_token_ids(sp_dir):
    llm = make(sp_dir)
    want = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert llm.generate([list(np.array([5, 6, 7]))], GREEDY)[0].token_ids == want
    assert llm.generate(list(np.array([5, 6, 7])), GREEDY)[0].token_ids == want  # one prompt


def test_llm_options_are_checked(sp_dir):
    assert make(sp_dir, kv_cache_memory=1.5e6).blocks.num_blocks > 0
    for kwargs, match in ((dict(kv_cache_memory="1e6"), "kv_cache_memory"),
                          (dict(kv_cache_memory=0), "kv_cache_memory"),
                          (dict(seed="abc"), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed")):
        with pytest.raises(ValueError, match=match):
            make(sp_dir, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            LLM(str(sp_dir), device="cuda")


def test_stream_checks_its_prompt_when_called(sp_dir):
    llm = make(sp_dir)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.stream("")  # not iterated
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.stream([5, 500])
    assert_idle(llm)


def test_a_replacement_character_stop_string_waits_for_whole_characters(sp_dir):
    llm = make(sp_dir)
    params = SamplingParams(stop=("\ufffd",))
    seq = Sequence(0, [5, 6], params, seed=0)
    seq.tokens.append(BYTE_C3)  # the first byte of "é": decodes to U+FFFD for now
    assert not llm.engine.scheduler.hits_stop_string(seq)
    seq.tokens.append(BYTE_A9)
    assert not llm.engine.scheduler.hits_stop_string(seq)
    stream = TextStream(llm.tokenizer, stop=("\ufffd",), prompt_ids=[5, 6])
    assert stream.push([BYTE_C3], finished=False) == ""
    assert stream.push([BYTE_C3, BYTE_A9, 7], finished=True) == "é e"


def test_reserved_drafter_names_win_over_folders(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ngram").mkdir()
    assert isinstance(make(tiny, "ngram").drafter, NgramDrafter)
    with pytest.raises(ValueError, match="not a model directory"):
        make(tiny, "./ngram")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--max-tokens", "0"], "--max-tokens: expected an integer >= 1"),
    (["bench", "--max-tokens", "0"], "--max-tokens: expected an integer >= 1"),
])
def test_cli_rejects_zero_max_tokens(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_errors_without_tracebacks(tmp_path, sp_dir, capsys):
    existing = tmp_path / "a-file"
    existing.write_text("")
    assert main(["convert", "llama2c", str(existing), str(existing), str(existing)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "--target", str(sp_dir), "--prompt", "x", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------- interleaving

DOOM, INTERRUPT = 3, 4  # a prompt starting with DOOM fails at run time; INTERRUPT: Ctrl-C in its generate()


def _random_request(rng, first=None):
    """(prompt, params): greedy or seeded sampling, sometimes a stop string or EOS."""
    prompt = [first if first is not None else rng.randrange(5, 95)]
    prompt += [rng.randrange(5, 95) for _ in range(rng.randrange(0, 9))]
    if first in (DOOM, INTERRUPT):  # long enough to reach its failure (after 2 tokens, or 2 steps)
        return prompt, SamplingParams(max_tokens=rng.randrange(10, 16), temperature=0, ignore_eos=True)
    kw = dict(max_tokens=rng.randrange(3, 16), ignore_eos=rng.random() < 0.7)
    if rng.random() < 0.5:
        kw.update(temperature=0.9, top_k=rng.choice([0, 20]), seed=rng.randrange(1000))
    else:
        kw.update(temperature=0)
    if rng.random() < 0.3:
        kw.update(stop=(" " + rng.choice(WORDS[:26]),))
    return prompt, SamplingParams(**kw)


@dataclasses.dataclass
class _Job:
    kind: str  # "stream", "handle" or "generate"
    requests: list  # [(prompt, params)]
    cut: int | None = None  # stream: stop reading after this many pieces (cancel)
    live: object = None  # the stream's iterator or the Request handle, once started
    text: str = ""
    pieces: int = 0


def _interleave(llm, solo, order_seed):
    """Start and advance jobs in a random order on ``llm``; returns how many requests
    completed. Every completed request must equal its run alone on ``solo``."""
    rng = random.Random(order_seed)
    armed = [None]  # verify calls until the injected Ctrl-C, while an INTERRUPT generate() runs

    def doomed_or_interrupted(seqs):
        if any(s.tokens[0] == DOOM and s.num_generated >= 2 for s in seqs):
            return True
        if armed[0] is not None:
            armed[0] -= 1
            if armed[0] == 0:
                armed[0] = None
                raise KeyboardInterrupt
        return False

    fail_when(llm, doomed_or_interrupted)
    jobs = [_Job("stream", [_random_request(rng)], cut=rng.choice([None, None, 1, 2])) for _ in range(4)]
    jobs += [_Job("stream", [_random_request(rng, DOOM)])]
    jobs += [_Job("handle", [_random_request(rng, DOOM if i == 0 else None)]) for i in range(3)]
    jobs += [_Job("generate", [_random_request(rng) for _ in range(rng.randrange(1, 4))]) for _ in range(2)]
    jobs += [_Job("generate", [_random_request(rng), _random_request(rng, DOOM)])]
    jobs += [_Job("generate", [_random_request(rng, INTERRUPT), _random_request(rng)])]
    rng.shuffle(jobs)
    completed, failed, interrupted = [], [], 0  # completed: (prompt, params, text, output or None)
    active = []
    while jobs or active:
        if jobs and (not active or rng.random() < 0.3):  # start a job
            job = jobs.pop()
            (prompt, params), *_ = job.requests
            if job.kind == "stream":
                job.live = llm.stream(prompt, params)
                active.append(job)
            elif job.kind == "handle":
                job.live = llm.submit(prompt, params)
                active.append(job)
            else:  # runs to completion now, stepping everyone else's requests too
                prompts, params = [p for p, _ in job.requests], [q for _, q in job.requests]
                interrupt = prompts[0][0] == INTERRUPT
                armed[0] = 2 if interrupt else None
                try:
                    outs = llm.generate(prompts, params)
                except KeyboardInterrupt:
                    assert interrupt
                    interrupted += 1
                    continue
                except RuntimeError as e:
                    assert any(p[0] == DOOM for p in prompts) and "injected failure" in str(e)
                    failed.append(prompts)
                    continue
                finally:
                    armed[0] = None
                assert not interrupt, "the interrupt should have hit this call"
                completed += [(p, q, o.text, o) for p, q, o in zip(prompts, params, outs, strict=True)]
            continue
        job = rng.choice(active)  # advance a started job
        (prompt, params), = job.requests
        if job.kind == "stream":
            try:
                job.text += next(job.live)
                job.pieces += 1
            except StopIteration:
                active.remove(job)
                completed.append((prompt, params, job.text, None))
            except RuntimeError as e:
                assert prompt[0] == DOOM and "injected failure" in str(e)
                active.remove(job)
                failed.append(prompt)
            else:
                if job.cut is not None and job.pieces >= job.cut:
                    job.live.close()  # the caller stops reading: cancelled
                    active.remove(job)
        else:
            req = job.live
            if not req.finished:
                llm.step()
            job.text += req.new_text()
            if req.finished:
                active.remove(job)
                if prompt[0] == DOOM:
                    assert req.finish_reason == "error" and "injected failure" in str(req.error)
                    failed.append(prompt)
                else:
                    assert req.finish_reason in ("stop", "length") and job.text == req.output().text
                    completed.append((prompt, params, job.text, req.output()))
    assert_idle(llm)
    assert len(failed) == 3 and interrupted == 1  # the doomed stream, handle and generate call; the Ctrl-C
    for prompt, params, text, out in completed:
        want = solo.generate([prompt], params)[0]
        assert text == want.text, (prompt, params)
        if out is not None:
            assert (out.token_ids, out.finish_reason) == (want.token_ids, want.finish_reason), (prompt, params)
    return len(completed)


@pytest.mark.parametrize("order_seed, drafter", [(0, "early-exit:1"), (1, "draft-model"), (2, "draft-model")])
def test_random_interleaving_of_streams_handles_and_generate_calls(sp_dir, draft_dir, order_seed, drafter):
    """A separate draft model keeps a cache of its own: a failed step must roll it back too."""
    draft = str(draft_dir) if drafter == "draft-model" else drafter
    llm = make(sp_dir, draft, num_draft_tokens=3, block_size=4, max_num_seqs=3)
    solo = make(sp_dir, draft, num_draft_tokens=3, block_size=4)
    assert _interleave(llm, solo, order_seed) >= 5


def test_load_reports_running_waiting_and_cache_use(tiny):
    llm = make(tiny, max_num_seqs=2)
    assert llm.load() == (0, 0, 0.0)
    reqs = [llm.submit([5, 6, 7], GREEDY) for _ in range(3)]
    assert llm.load() == (0, 3, 0.0)  # queued, nothing admitted before a step
    llm.step()
    load = llm.load()
    assert (load.running, load.waiting) == (2, 1)
    used = llm.blocks.num_blocks - llm.blocks.num_free_blocks
    assert 0 < used and load.kv_cache_usage == used / llm.blocks.num_blocks
    reqs[0].cancel()
    llm.step()
    assert llm.load().waiting == 0
    while llm.has_work():
        llm.step()
    assert llm.load() == (0, 0, 0.0)
