"""Policy registry: names, errors, and third-party policies through the entry point group."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from vllm_dapd.decoding import Policy, StepResult, available_policies, get_policy, register_policy
from vllm_dapd.decoding import registry

BUILTIN = {"low_confidence", "random", "entropy", "margin", "maskgit_plus", "threshold", "factor", "eb", "localleap", "klass", "ieb"}


def test_builtins_are_registered():
    assert BUILTIN <= set(available_policies())
    for name in BUILTIN:
        pol = get_policy(name)
        assert pol.name == name and isinstance(pol, Policy)
        doc = sys.modules[type(pol).__module__].__doc__ or ""
        assert len(doc) > 100, f"{name}: the module docstring should cite its source"


def test_unknown_policy_names_it():
    with pytest.raises(ValueError, match="no_such_policy"):
        get_policy("no_such_policy")


def test_unknown_param_names_it():
    with pytest.raises(ValueError, match="bogus"):
        get_policy("threshold").make_params({"bogus": 1.0})


def test_name_clash_with_another_class_is_refused():
    class Impostor(Policy):
        name = "threshold"

    with pytest.raises(ValueError, match="threshold"):
        register_policy(Impostor)


@dataclass(frozen=True)
class _Params:
    pass


class ThirdParty(Policy):
    """A policy an outside package would ship."""

    name = "third_party_test_policy"
    Params = _Params

    def step(self, state, params):
        return StepResult(commit=state.masked, tokens=state.tokens)


class _FakeEntryPoint:
    def __init__(self, obj):
        self.obj = obj

    def load(self):
        return self.obj


def test_entry_point_registration(monkeypatch):
    seen = {}

    def fake_entry_points(group):
        seen["group"] = group
        return [_FakeEntryPoint(ThirdParty)] if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "third_party_test_policy" in available_policies()
    assert seen["group"] == "vllm_dapd.policies"
    assert isinstance(get_policy("third_party_test_policy"), ThirdParty)
    assert BUILTIN <= set(available_policies())
