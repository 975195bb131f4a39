"""bench/gpu_check.py's CPU-checkable parts: it refuses clearly without CUDA, fits its
time budget, and a part stopped at its limit leaves the rows it printed."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_refuses_without_cuda(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_unknown_part(gpu_check, capsys):
    assert gpu_check.main(["attention", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_parts_fit_in_eight_minutes(gpu_check):
    assert sum(limit for limit, _ in gpu_check.PARTS.values()) <= gpu_check.TOTAL_S <= 480
    assert list(gpu_check.PARTS)[:2] == ["attention", "graphs"]  # the budgets run first


def test_a_part_past_its_limit_is_killed_and_keeps_its_rows(gpu_check, monkeypatch, capfd):
    row = "print('| row 1 | 12.5 |', flush=True); import time; time.sleep(60)"
    monkeypatch.setitem(gpu_check.PARTS, "slow", (1, [sys.executable, "-c", row]))
    start = time.perf_counter()
    assert gpu_check.run_part("slow", 1.5) == 124
    assert time.perf_counter() - start < 20
    out = capfd.readouterr().out
    assert "| row 1 | 12.5 |" in out and "stopped at its 2 s limit" in out
