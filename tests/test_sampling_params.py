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


# ---------------------------------------------------------------------- unset vs given


def test_unset_fields_read_as_library_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p) == (1.0, 0, 1.0)
    assert p.unset == {"temperature", "top_k", "top_p"}
    assert SamplingParams(temperature=None, top_k=None, top_p=None) == p
    given = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    assert given.unset == frozenset()
    assert given != p  # same values, but only the given ones override a model's defaults
    assert repr(given) == repr(p)


def test_with_defaults_fills_only_unset_fields():
    model = dict(temperature=0.6, top_k=20, top_p=0.95)
    p = SamplingParams(max_tokens=5, seed=3, stop=["x"], stop_token_ids=[9], ignore_eos=True).with_defaults(**model)
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 20, 0.95)
    assert (p.max_tokens, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (5, 3, ("x",), (9,), True)
    assert p.unset == frozenset()
    # a given value wins, even when it equals the library default
    q = SamplingParams(temperature=1.0, top_k=0).with_defaults(**model)
    assert (q.temperature, q.top_k, q.top_p) == (1.0, 0, 0.95)
    greedy = SamplingParams(temperature=0).with_defaults(**model)
    assert greedy.temperature == 0.0
    # a model without defaults keeps the library's
    assert SamplingParams().with_defaults(temperature=None) == SamplingParams(temperature=1.0, top_k=0, top_p=1.0)


def test_with_defaults_checks_names_and_ranges():
    with pytest.raises(ValueError, match="with_defaults takes temperature, top_k, top_p, got min_p"):
        SamplingParams().with_defaults(min_p=0.1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams().with_defaults(temperature=-1.0)


def test_copies_keep_unset_fields():
    import dataclasses

    p = SamplingParams(top_k=5)
    assert SamplingParams(**vars(p)) == p and SamplingParams(**vars(p)).unset == {"temperature", "top_p"}
    assert dataclasses.replace(p, max_tokens=3).unset == {"temperature", "top_p"}
    # a new value given through replace is given
    q = dataclasses.replace(p, temperature=0.5)
    assert q.temperature == 0.5 and q.unset == {"top_p"}
