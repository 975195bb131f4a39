"""bench/e2e.py runs end to end at tiny sizes, and its speedup formula is right."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "e2e.py"
spec = importlib.util.spec_from_file_location("e2e", _PATH)
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)


def test_leviathan_formula():
    # α = 0: only the sampled token, at the price of k draft steps
    assert e2e.leviathan_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    # free drafts, perfect acceptance: k + 1 tokens per target step
    assert e2e.leviathan_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert e2e.leviathan_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / (0.2 * 1.2))


def test_e2e_tiny_run_prints_the_table(capsys):
    e2e.main(["--shape", "tiny", "--batches", "2", "--max-tokens", "8", "--skip-hf"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2  # greedy and temperature 1
    # ε = 0: the later layers add nothing, so the early-exit draft is always accepted
    assert all(float(r.split("|")[8]) == 1.0 for r in rows)
