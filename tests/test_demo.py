"""The embedded demo pair and `specdec demo`."""

import io

from specdec import LLM, SamplingParams
from specdec.cli import main
from specdec.demo import SNIPPETS, demo_dirs, run_demo
from specdec.models import ModelConfig


def test_embedded_pair_ships_and_shares_a_vocabulary():
    target, draft = demo_dirs()
    t, d = ModelConfig.from_file(target), ModelConfig.from_file(draft)
    assert t.vocab_size == d.vocab_size
    t_params = t.num_layers * (4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size)
    d_params = d.num_layers * (4 * d.hidden_size**2 + 3 * d.hidden_size * d.intermediate_size)
    assert d_params * 3 < t_params  # the draft is a small fraction of the target
    assert (target / "tokenizer.json").is_file() and (draft / "tokenizer.json").is_file()


def test_demo_pair_speculates_losslessly():
    target, draft = demo_dirs()
    params = SamplingParams(max_tokens=24, temperature=0)
    plain = [o.token_ids for o in LLM(target).generate(list(SNIPPETS), params)]
    spec = LLM(target, draft=draft)
    assert [o.token_ids for o in spec.generate(list(SNIPPETS), params)] == plain
    assert spec.metrics()["acceptance_rate"] > 0.2  # the trained draft really agrees with the target


def test_run_demo_streams_and_reports():
    out = io.StringIO()
    figures = run_demo(max_tokens=12, out=out)
    text = out.getvalue()
    for snippet in SNIPPETS:
        assert snippet in text
    for label in ("acceptance rate", "mean accepted length", "speculative", "plain decoding", "speedup"):
        assert label in text
    assert figures["num_generated_tokens"] == 12 * len(SNIPPETS)
    assert figures["speculative_tokens_per_second"] > 0 and figures["plain_tokens_per_second"] > 0


def test_cli_demo(capsys):
    assert main(["demo", "--max-tokens", "4"]) == 0
    assert "mean accepted length" in capsys.readouterr().out
