"""``decoding.policy.check_int``: the one bounded integer checker every setting goes through."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vllm_dapd.decoding.policy import INT_LIMIT, check_int


def test_lenient_takes_what_json_delivers_for_an_integer():
    assert check_int("steps", 32.0, 1, lenient=True) == 32
    assert check_int("steps", " 32 ", 1, lenient=True) == 32
    assert check_int("steps", "-3", lenient=True) == -3


@pytest.mark.parametrize("value", [True, 1.5, "3.0", "0\x1f", "\x1c7", "1e3", "", None, [3]])
def test_anything_else_is_an_error_naming_the_key(value):
    with pytest.raises(ValueError, match=r"^steps: must be an integer"):
        check_int("steps", value, lenient=True)


def test_bounds_name_the_key():
    with pytest.raises(ValueError, match=r"^steps: must be >= 1, got 0"):
        check_int("steps", 0, 1)
    with pytest.raises(ValueError, match=rf"^steps: must be <= {INT_LIMIT}"):
        check_int("steps", INT_LIMIT + 1)


@given(st.text(max_size=6))
def test_a_string_is_an_int_or_an_error_naming_the_key(text):
    try:
        assert isinstance(check_int("k", text, lenient=True, high=None), int)
    except ValueError as e:
        assert str(e).startswith("k: ")
