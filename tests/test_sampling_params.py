"""SamplingParams: every field validated on construction, with a message naming it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from specdec import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (16, 1.0, 0, 1.0, None)
    assert p.stop == () and p.stop_token_ids == () and p.ignore_eos is False


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0),
        dict(temperature=0.0),
        dict(temperature=2),
        dict(top_p=1),
        dict(top_p=1e-6),
        dict(top_k=0),
        dict(top_k=5),
        dict(max_tokens=0),
        dict(seed=0),
        dict(seed=2**63 - 1),
        dict(stop_token_ids=[0, 5]),
    ],
)
def test_boundary_values_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        got = getattr(p, name)
        assert got == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", -1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1.0"),
        ("temperature", True),
        ("temperature", None),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("top_p", 2),
        ("top_p", math.nan),
        ("top_p", "0.9"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("max_tokens", "8"),
        ("max_tokens", False),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", 1.5),
        ("seed", "7"),
        ("seed", True),
    ],
)
def test_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_as_str_is_one_stop_string():
    p = SamplingParams(stop="the end")
    assert p.stop == ("the end",)  # not split into characters


def test_stop_list_becomes_tuple():
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[3, 4])
    assert p.stop == ("a", "bc") and p.stop_token_ids == (3, 4)
    hash(p)  # frozen and hashable once the lists are tuples


@pytest.mark.parametrize("stop", [[""], "", ["ok", 3], [None]])
def test_bad_stop_strings(stop):
    with pytest.raises(ValueError, match="stop strings"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("ids", [[-1], [1.0], ["3"], [True]])
def test_bad_stop_token_ids(ids):
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=ids)


def test_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
