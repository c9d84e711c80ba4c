"""``--plugin NAME``: where the value goes, conflicts, and the AR-model check (no server needed)."""

from __future__ import annotations

import pytest

from vllm_dapd.engine.vllm.cli import check_architecture, merge_plugin_option


def test_plugin_sets_the_default_policy_and_keeps_other_settings():
    merged = merge_plugin_option({"dapd": {"block_length": 16}, "other": 1}, "threshold")
    assert merged == {"dapd": {"block_length": 16, "policy": "threshold"}, "other": 1}


def test_conflicting_policy_is_an_error():
    with pytest.raises(ValueError, match="--plugin dapd: conflicts"):
        merge_plugin_option({"dapd": {"policy": "threshold"}}, "dapd")


def test_autoregressive_architecture_is_refused():
    check_architecture("dapd", ["LLaDAModelLM"], "m")
    with pytest.raises(ValueError, match="not a masked diffusion model"):
        check_architecture("dapd", ["LlamaForCausalLM"], "m")
    check_architecture("dapd", ["LLaDA2MoeModelLM"], "m")  # block diffusion is served too


def test_parser_gets_the_option():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_dapd.plugin

    vllm_dapd.plugin.register()
    args = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "x", "--plugin", "dawn"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.additional_config["dapd"]["policy"] == "dawn"


def test_no_model_argument_serves_the_embedded_demo_model():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_dapd.plugin
    from vllm_dapd.demo import CHECKPOINT

    vllm_dapd.plugin.register()
    args = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--plugin", "dapd"])
    assert EngineArgs.from_cli_args(args).model == CHECKPOINT
