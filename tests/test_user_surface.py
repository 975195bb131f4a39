"""The user's surface: streaming, progress, metrics, run-time errors, and a soak run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from specdec import LLM, NonFiniteLogitsError, SamplingParams
from specdec.detokenize import TextStream, output_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", max_position_embeddings=128)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from conftest import STORIES_DIR
    from specdec.models.convert import convert_llama2c

    ckpt, tok = STORIES_DIR / "stories260K.bin", STORIES_DIR / "tok512.bin"
    if not ckpt.is_file():
        pytest.skip(f"stories260K is not at {STORIES_DIR} (the shared models folder is absent)")
    return convert_llama2c(ckpt, tok, tmp_path_factory.mktemp("stories"))


# ---------------------------------------------------------------------- streaming


def test_text_stream_holds_back_split_characters(stories):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories))
    text = "Tom said café 漢字 🙂 and left."
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) + 8  # the rare characters really are split into byte tokens
    stream, pieces = TextStream(tok), []
    for i in range(1, len(ids) + 1):
        piece = stream.push(ids[:i], finished=i == len(ids))
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert sum(1 for p in pieces if p) < len(ids)  # some tokens completed no character


def test_text_stream_never_emits_a_stop_string(stories):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories))
    ids = tok.encode("One day, she saw a big red ball.", add_special_tokens=False)
    stream = TextStream(tok, stop=("big red",))
    out = "".join(stream.push(ids[:i], finished=False) for i in range(1, len(ids)))
    out += stream.push(ids, finished=True)
    assert out == output_text(tok, ids, ("big red",)) == "One day, she saw a "


@pytest.mark.parametrize("draft", [None, "early-exit:3", "ngram"])
def test_stream_equals_generate(stories, draft):
    llm = LLM(stories, draft=draft)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=3, stop=("ball",))
    pieces = list(llm.stream("Once upon a time", params))
    (out,) = llm.generate("Once upon a time", params)
    assert len(pieces) > 3 and "".join(pieces) == out.text


def test_stream_closed_early_releases_its_blocks(stories):
    llm = LLM(stories, draft="early-exit:3")
    gen = llm.stream("Once upon a time", SamplingParams(max_tokens=64, temperature=0))
    next(gen)
    gen.close()
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks and not llm.engine.has_work()
    (out,) = llm.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=0))
    assert len(out.token_ids) == 8


# ---------------------------------------------------------------------- progress and metrics


def test_progress_bar_only_when_asked(tiny, capsys):
    llm = LLM(tiny)
    prompts = [[1, 2, 3], [4, 5]]
    llm.generate(prompts, SamplingParams(max_tokens=2), progress=True)
    assert "generate" in capsys.readouterr().err
    llm.generate(prompts, SamplingParams(max_tokens=2), progress=False)
    llm.generate(prompts, SamplingParams(max_tokens=2))  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""


def test_instance_metrics_add_up(tiny):
    llm = LLM(tiny, draft="early-exit:1", num_draft_tokens=3)
    outs = llm.generate([[1, 2, 3], [7] * 9, [5, 6, 5, 6]], SamplingParams(max_tokens=12, seed=0))
    m = llm.metrics()
    assert m["num_requests"] == 3
    assert m["num_generated_tokens"] == sum(len(o.token_ids) for o in outs)
    assert m["num_steps"] == sum(o.metrics.num_steps for o in outs)
    assert m["num_accepted_tokens"] == sum(o.metrics.num_accepted_tokens for o in outs)
    assert m["num_draft_tokens"] == sum(o.metrics.num_draft_tokens for o in outs)
    assert len(m["acceptance_rate_by_position"]) == 3
    assert all(0 <= r <= 1 for r in m["acceptance_rate_by_position"])
    # a draft token is accepted only after every earlier one was: counts never rise with position
    accepted = [sum(o.metrics.accepted_per_position[i] for o in outs) for i in range(3)]
    assert accepted == sorted(accepted, reverse=True) and accepted[0] > 0
    assert m["tokens_per_second"] > 0


# ---------------------------------------------------------------------- run-time errors


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny):
    """The tiny model with token 7's embedding set to NaN: any request that feeds token 7
    gets NaN logits at run time, every other request is fine."""
    path = tmp_path_factory.mktemp("poisoned")
    for f in ("config.json",):
        (path / f).write_text((tiny / f).read_text())
    weights = load_file(tiny / "model.safetensors")
    weights["model.embed_tokens.weight"][7] = float("nan")
    save_file(weights, path / "model.safetensors")
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 97
    return path


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_nan_logits_name_the_request_and_the_instance_keeps_serving(poisoned, draft):
    llm = LLM(poisoned, draft=draft)
    with pytest.raises(NonFiniteLogitsError, match=r"request 1 at step 0") as e:
        llm.generate([[1, 2, 3], [4, 7, 5], [6, 8]], SamplingParams(max_tokens=5, seed=1))
    assert "request 0" not in str(e.value) and "request 2" not in str(e.value)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks and not llm.engine.has_work()
    outs = llm.generate([[1, 2, 3], [6, 8]], SamplingParams(max_tokens=5, seed=1, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5]


# ---------------------------------------------------------------------- soak


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_soak_2000_requests_complete_with_bounded_memory(tiny):
    llm = LLM(tiny, draft="ngram", num_draft_tokens=3, max_num_seqs=64, seed=0)
    gen = torch.Generator().manual_seed(0)
    done, rss = 0, []
    for _ in range(10):
        prompts = [torch.randint(0, 97, (int(n),), generator=gen).tolist()
                   for n in torch.randint(1, 12, (200,), generator=gen)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
        assert all(len(o.token_ids) == 4 and o.finish_reason == "length" for o in outs)
        done += len(outs)
        rss.append(_rss_mib())
    assert done == 2000 and llm.metrics()["num_requests"] == 2000
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    print(f"soak: RSS after the first 200 requests {rss[0]:.0f} MiB, after 2000 {rss[-1]:.0f} MiB")
    assert rss[-1] - rss[1] < 64, f"RSS grew from {rss[1]:.0f} to {rss[-1]:.0f} MiB over 1,600 requests"


def test_request_metrics_since_a_snapshot_counts_only_what_came_after():
    from specdec.sequence import RequestMetrics

    steps_before = [(2, 1, 2), (0, 0, 1)]  # (drafts, accepted, emitted)
    steps_after = [(3, 3, 4), (2, 0, 1), (0, 0, 1)]  # deeper than any step before the snapshot
    m, alone = RequestMetrics(), RequestMetrics()
    for step in steps_before:
        m.record_step(*step)
    snapshot = RequestMetrics()
    snapshot.merge(m)
    for step in steps_after:
        m.record_step(*step)
        alone.record_step(*step)
    assert m.since(snapshot) == alone
    assert alone.as_dict()["acceptance_rate_by_position"] == [1 / 2, 1 / 2, 1 / 1]
    assert alone.accepted_length_per_draft_step == 1 + 3 / 2 and alone.mean_accepted_length == 6 / 3
