"""Decoding settings: layering (defaults < server < request), aliases, and errors that name the key."""

from __future__ import annotations

import pytest

from vllm_dapd.engine.settings import DecodeSettings, resolve, server_settings


def test_layers_and_aliases():
    server = server_settings({"dapd": {"policy": "threshold", "block_length": 16}})
    settings, _ = resolve(server, {"diffusion_canvas_length": 8, "diffusion_max_steps": 4})
    assert (settings.policy, settings.block_length, settings.steps_per_block) == ("threshold", 8, 4)
    assert resolve(server, None)[0].steps_per_block == 16  # default: one commit per step


def test_cache_refresh_layers_and_survives_the_fold():
    server = server_settings({"dapd": {"cache_mode": "dual", "cache_refresh": "block"}})
    assert (server.cache_mode, server.cache_refresh) == ("dual", "block")
    assert server_settings({"dapd": server.as_overrides()}) == server  # what engine processes receive
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
