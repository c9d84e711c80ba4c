"""Decoding settings: layering (defaults < server < request), aliases, errors that name the key, and the
plan's round trip through vLLM's serialisation of a request."""

from __future__ import annotations

import pytest

from vllm_dapd.engine.core.settings import PLAN_KEY, DecodeSettings, Defaults, Plan, ScoreOptions, plan, resolve, server_defaults


def server_settings(additional_config):
    return server_defaults(additional_config).settings


def test_layers_and_aliases():
    server = server_settings({"dapd": {"policy": "threshold", "block_length": 16}})
    settings, _ = resolve(server, {"diffusion_canvas_length": 8, "diffusion_max_steps": 4})
    assert (settings.policy, settings.block_length, settings.steps_per_block) == ("threshold", 8, 4)
    assert resolve(server, None)[0].steps_per_block == 16  # default: one commit per step


def test_cache_refresh_layers_and_survives_the_fold():
    server = server_settings({"dapd": {"cache_mode": "dual", "cache_refresh": "block"}})
    assert (server.cache_mode, server.cache_refresh) == ("dual", "block")
    assert server_settings({"dapd": server.as_overrides()}) == server
    assert resolve(server, {"cache_refresh": "final"})[0].cache_refresh == "final"
    assert DecodeSettings().cache_refresh == "final"


def test_vllm_own_extra_args_are_passed_over():
    settings, _ = resolve(DecodeSettings(), {"kv_transfer_params": {"x": 1}, "session_id": "s"})
    assert settings == DecodeSettings()


def test_http_strings_for_integers():
    assert resolve(DecodeSettings(), {"block_length": "8"})[0].block_length == 8


@pytest.mark.parametrize("extra,name", [
    ({"policy": "nope"}, "policy"),
    ({"block_length": 0}, "block_length"),
    ({"block_length": 2.5}, "block_length"),
    ({"steps": -1}, "steps"),
    ({"cache_mode": "full"}, "cache_mode"),
    ({"cache_refresh": "always"}, "cache_refresh"),
    ({"cache_refresh": 1}, "cache_refresh"),
    ({"no_such_knob": 1}, "no_such_knob"),
])
def test_errors_name_the_key(extra, name):
    with pytest.raises(ValueError) as e:
        resolve(DecodeSettings(), extra)
    assert str(e.value).startswith(name)


def test_server_section_must_be_a_mapping():
    with pytest.raises(ValueError, match="additional_config.dapd"):
        server_settings({"dapd": "dapd"})


def test_server_defaults_fold_and_read_back_scoring_options_too():
    """What ``hooks.fold_server_defaults`` writes is what every engine process reads back, scoring
    options included (they used to be dropped by the fold)."""
    defaults = server_defaults({"dapd": {"score_samples": 8, "score_window": 0}},
                               {"dapd": {"policy": "threshold", "threshold": 0.8}})
    assert (defaults.score.samples, defaults.score.window, defaults.settings.policy) == (8, 0, "threshold")
    assert server_defaults({"dapd": defaults.as_config()}) == defaults
    p = plan(defaults, {"score_window": 4}, 8, 100)
    assert (p.score.samples, p.score.window, p.params.threshold) == (8, 4, 0.8)


@pytest.mark.parametrize("section,name", [({"score_samples": 0}, "score_samples"), ({"stream_canvas": 1}, "stream_canvas"),
                                          ({"policy": "threshold", "threshold": 2}, "threshold"),
                                          ({"score_nope": 1}, "score_nope")])
def test_a_bad_server_default_fails_naming_the_key(section, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        server_defaults({"dapd": section})


def test_the_plan_key_is_reserved():
    with pytest.raises(ValueError, match=f"^{PLAN_KEY}:"):
        plan(Defaults(), {PLAN_KEY: 1}, 8, 100)


def test_plan_survives_vllms_request_serialisation_and_reads_back_unresolved(monkeypatch):
    """The admitted plan, as a dict in ``extra_args``, through vLLM's own msgpack codec of an
    ``EngineCoreRequest`` (what reaches the EngineCore), reads back equal, for every policy; reading
    it back resolves nothing."""
    import vllm_dapd.engine.core.settings as settings
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_dapd.decoding.registry import available_policies

    plans = [plan(Defaults(), {"policy": name, "block_length": 4, "steps": 2, "score_choices": [[5, 6], [7]],
                               "score_samples": 3, "trace": True}, 10, 100) for name in available_policies()]
    plans.append(plan(Defaults(), {"policy": "threshold", "threshold": 0.7, "stream_canvas": 1}, 5, 3))

    def resolved(*args, **kwargs):
        raise AssertionError("from_dict must not resolve")

    monkeypatch.setattr(settings, "resolve", resolved)
    for p in plans:
        sp = SamplingParams(max_tokens=10, extra_args={"policy": p.settings.policy, PLAN_KEY: p.to_dict()})
        request = EngineCoreRequest(request_id="r", prompt_token_ids=[1, 2, 3], mm_features=None, sampling_params=sp,
                                    pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=None,
                                    data_parallel_rank=None)
        got = MsgpackDecoder(EngineCoreRequest).decode(MsgpackEncoder().encode(request))
        back = Plan.from_dict(got.sampling_params.extra_args[PLAN_KEY])
        assert back == p and back.params == p.params and back.score.choices == p.score.choices
    assert plans[-1].stream_canvas and plans[-1].gen_length == 3 and plans[0].score == ScoreOptions(samples=3,
                                                                                                   choices=((5, 6), (7,)))


@pytest.mark.parametrize("change,name", [(lambda d: d.pop("score"), "dapd_plan"),
                                         (lambda d: d["settings"].update(block_length=0), "block_length"),
                                         (lambda d: d.update(gen_length=0), "gen_length"),
                                         (lambda d: d["params"].update(nope=1), "dapd_plan"),
                                         (lambda d: d["score"].update(samples=10**6), "score_samples")])
def test_a_damaged_plan_is_refused_naming_what(change, name):
    d = plan(Defaults(), {"block_length": 4}, 8, 100).to_dict()
    change(d)
    with pytest.raises(ValueError, match=f"^{name}"):
        Plan.from_dict(d)
