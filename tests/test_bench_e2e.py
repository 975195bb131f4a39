"""specdec.benchmark (``specdec bench``, ``bench/e2e.py``) runs end to end at tiny sizes,
and its speedup formula is right."""

import pytest

from specdec import benchmark
from specdec.cli import main as cli_main


def _table(out: str) -> list[dict]:
    """The markdown table's rows as {column heading: cell}."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(heads, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_leviathan_formula():
    # α = 0: only the sampled token, at the price of k draft steps
    assert benchmark.leviathan_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    # free drafts, perfect acceptance: k + 1 tokens per target step
    assert benchmark.leviathan_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert benchmark.leviathan_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / (0.2 * 1.2))


def test_e2e_tiny_run_prints_the_table(capsys):
    assert benchmark.main(["--shape", "tiny", "--batches", "2", "--max-tokens", "8", "--skip-hf"]) == 0
    rows = _table(capsys.readouterr().out)
    assert [(r["batch"], r["T"]) for r in rows] == [("2", "0"), ("2", "1")]
    # ε = 0: the later layers add nothing, so the early-exit draft is always accepted
    assert all(float(r["α"]) == 1.0 for r in rows)
    # 8 tokens, k = 4, all accepted: 4 drafts emit 5 tokens, then max_tokens leaves room for 2 drafts
    assert all(float(r["mean accepted"]) == 4.0 and float(r["draft/step"]) == 3.0 for r in rows)


def test_cli_bench_prints_a_row_per_batch_and_temperature(capsys):
    assert cli_main(["bench", "--shape", "tiny", "--batches", "1,2", "--max-tokens", "6", "--prompt-len", "8",
                     "--skip-hf"]) == 0
    out = capsys.readouterr().out
    assert "synthetic pair" in out.splitlines()[0]
    rows = _table(out)
    assert [(r["batch"], r["T"]) for r in rows] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    for r in rows:
        assert float(r["specdec plain tok/s"]) > 0 and float(r["specdec spec tok/s"]) > 0
        assert r["hf static tok/s"] == r["hf assisted tok/s"] == "—"


def test_cli_bench_demo_pair(capsys):
    assert cli_main(["bench", "--pair", "demo", "--batches", "1", "--max-tokens", "16", "--prompt-len", "8",
                     "--skip-hf"]) == 0
    out = capsys.readouterr().out
    assert "demo pair" in out.splitlines()[0]
    greedy, sampled = _table(out)
    assert all(0.0 <= float(r["α"]) <= 1.0 for r in (greedy, sampled))
    # the demo draft is distilled from the target: it agrees well beyond chance (1/2048) even on noise
    assert float(greedy["α"]) > 0.2


def test_engine_flags_reach_llm_only_when_given(monkeypatch, capsys):
    import specdec

    seen = []

    def llm(target, draft=None, **kwargs):  # records the engine flags, builds the LLM without them
        seen.append((draft, {k: kwargs.pop(k) for k in ("adaptive", "cuda_graphs") if k in kwargs}))
        return real(target, draft=draft, **kwargs)

    real = specdec.LLM
    monkeypatch.setattr(specdec, "LLM", llm)
    args = ["bench", "--batches", "1", "--max-tokens", "4", "--prompt-len", "4", "--skip-hf"]
    assert cli_main(args) == 0
    assert all(flags == {} for _, flags in seen)
    seen.clear()
    assert cli_main(args + ["--no-adaptive", "--cuda-graphs"]) == 0
    assert "adaptive=False, cuda_graphs=True" in capsys.readouterr().out
    # adaptive speculation only where there is a drafter; CUDA graphs for every specdec run
    plain, spec = {"cuda_graphs": True}, {"adaptive": False, "cuda_graphs": True}
    # built once for every row: the target plain, the target speculating, the draft plain (for c)
    assert [flags for _, flags in seen] == [plain, spec, plain]
    assert [d for d, _ in seen] == [None, "early-exit:2", None]


def test_cli_bench_any_target_with_early_exit(tmp_path, capsys):
    """--target/--draft: any checkpoint; transformers gets the first N layers as a model."""
    from checkpoints import make_checkpoint

    target = make_checkpoint(tmp_path / "t", num_layers=3, seed=0)
    assert cli_main(["bench", "--target", str(target), "--draft", "early-exit:2", "--batches", "1",
                     "--max-tokens", "6", "--prompt-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "with early-exit:2" in out.splitlines()[0]
    for r in _table(out):
        assert float(r["hf static tok/s"]) > 0 and float(r["hf assisted tok/s"]) > 0
        assert 0.0 <= float(r["α"]) <= 1.0
    # the assistant written for transformers is the target's first two layers, weights and all
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(target))
    cut = AutoModelForCausalLM.from_pretrained(benchmark.first_layers(str(target), 2, tmp_path / "cut", None))
    assert cut.config.num_hidden_layers == 2
    for name, value in cut.state_dict().items():
        assert (value == full.state_dict()[name]).all(), name
    with pytest.raises(SystemExit, match="--target needs --draft"):
        cli_main(["bench", "--target", str(target)])


def test_cli_bench_an_eagle3_head_against_the_demo_target(tmp_path, capsys):
    """--draft HEAD alone: the head drafts for the demo target; c and the prediction are
    n/a (a head cannot decode on its own), the measured columns are numbers."""
    import json

    from eagle3_reference import make_eagle3_head
    from specdec.demo import demo_dirs

    cfg = json.loads((demo_dirs()[0] / "config.json").read_text())
    head = make_eagle3_head(tmp_path / "head", vocab_size=cfg["vocab_size"], target_hidden=cfg["hidden_size"],
                            num_heads=4, num_kv_heads=2, aux_ids=[1, 2, 3], seed=0)
    assert cli_main(["bench", "--draft", str(head), "--batches", "1", "--max-tokens", "8", "--prompt-len", "4",
                     "--skip-hf"]) == 0
    out = capsys.readouterr().out
    assert "with EAGLE-3 head" in out.splitlines()[0] and "c, predicted: n/a" in out
    rows = _table(out)
    assert len(rows) == 2
    for r in rows:
        assert r["c"] == r["predicted"] == r["achieved / predicted"] == "n/a"
        assert float(r["specdec spec tok/s"]) > 0 and 0.0 <= float(r["α"]) <= 1.0
        assert float(r["draft/step"]) > 0  # the head drafted
