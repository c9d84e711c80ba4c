"""``vllm serve MODEL --plugin NAME``: the option, and where its value goes.

General plugins load before vLLM adds the engine options to the parser:
``AsyncEngineArgs.add_cli_args`` calls ``load_general_plugins()`` and only then
``EngineArgs.add_cli_args(parser)`` (vllm/engine/arg_utils.py). So ``register()`` can wrap that
static method to add ``--plugin``. ``EngineArgs.from_cli_args`` copies dataclass fields only; the
wrapped one folds the value into ``additional_config["dapd"]["policy"]``, which reaches every
process inside ``VllmConfig``. ``create_engine_config`` is wrapped to fail clearly when the
option names a policy but the model is not a masked diffusion model.

Without ``--plugin`` nothing changes: vLLM's parser, its default model and its help text stay
vLLM's. With ``--plugin`` and no model (``model`` left at vLLM's default, an autoregressive model
``--plugin`` would refuse anyway), the embedded demo model is served as ``dapd-demo``
(``--served-model-name``), so clients need not send a filesystem path.
"""

from __future__ import annotations

import os
from typing import Any

from .hooks import DIFFUSION_ARCHITECTURES
from ..core.settings import ADDITIONAL_CONFIG_KEY

DEMO_NAME = "dapd-demo"
HELP = ("vllm-dapd: serve a masked diffusion LM (LLaDA, Dream, LLaDA2) with this default unmasking policy "
        "(dapd, dawn, low_confidence, threshold, ...). With no model given, serves the embedded demo "
        f"model as '{DEMO_NAME}'. Other decoding defaults: the checkpoint's generation_config.json "
        "\"dapd\" section, then --additional-config '{\"dapd\": {\"block_length\": 32, \"steps\": 32, "
        "\"cache_mode\": \"none\"}}'; per request: extra_args / vllm_xargs.")


def merge_plugin_option(additional_config: dict | None, name: str) -> dict:
    """``additional_config`` with ``dapd.policy = name`` (a different explicit policy is an error)."""
    config = dict(additional_config or {})
    section = dict(config.get(ADDITIONAL_CONFIG_KEY) or {})
    if section.get("policy", name) != name:
        raise ValueError(f"--plugin {name}: conflicts with additional_config.{ADDITIONAL_CONFIG_KEY}.policy="
                         f"{section['policy']!r}")
    section["policy"] = name
    config[ADDITIONAL_CONFIG_KEY] = section
    return config


def check_architecture(name: str, architectures: list[str] | None, model: str) -> None:
    if not set(architectures or ()) & set(DIFFUSION_ARCHITECTURES):
        raise ValueError(f"--plugin {name}: {model} ({', '.join(architectures or ['unknown architecture'])}) is not "
                         f"a masked diffusion model; vllm-dapd serves {', '.join(DIFFUSION_ARCHITECTURES)}")


def use_demo_model(args: Any) -> None:
    """``--plugin`` with no model: the embedded demo checkpoint (offline), served as ``dapd-demo``.

    Edits the parsed namespace, which vLLM's API server also reads for the served model names."""
    from vllm.config import ModelConfig

    if getattr(args, "model", None) != ModelConfig.model or getattr(args, "model_tag", None) is not None:
        return
    from vllm_dapd.demo import CHECKPOINT  # package data; the engine does not import the demo otherwise

    if not os.path.isfile(os.path.join(CHECKPOINT, "config.json")):
        return
    args.model = CHECKPOINT
    if getattr(args, "served_model_name", None) is None:
        args.served_model_name = [DEMO_NAME]


def install_cli_option() -> None:
    """Wrap ``EngineArgs.add_cli_args`` / ``from_cli_args`` / ``create_engine_config`` (idempotent).

    Only where ``vllm.engine.arg_utils`` is already loaded: that is every process that parses a
    command line or builds a config (the plugins are loaded from inside it); EngineCore and worker
    processes skip the import.
    """
    import sys

    arg_utils = sys.modules.get("vllm.engine.arg_utils")
    if arg_utils is None:
        return
    EngineArgs = arg_utils.EngineArgs

    if getattr(EngineArgs, "_dapd_cli_installed", False):
        return
    EngineArgs._dapd_cli_installed = True
    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__
    create_engine_config = EngineArgs.create_engine_config

    def add_cli_args_with_plugin(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = add_cli_args(parser, *args, **kwargs)
        if not any("--plugin" in action.option_strings for action in parser._actions):
            parser.add_argument_group("vllm-dapd").add_argument("--plugin", default=None, metavar="NAME", help=HELP)
        return parser

    def from_cli_args_with_plugin(cls: type, args: Any) -> Any:
        name = getattr(args, "plugin", None)
        if name:
            use_demo_model(args)
        engine_args = from_cli_args(cls, args)
        if name:
            engine_args.additional_config = merge_plugin_option(engine_args.additional_config, name)
            engine_args._dapd_plugin = name
        return engine_args

    def create_engine_config_checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = create_engine_config(self, *args, **kwargs)
        name = getattr(self, "_dapd_plugin", None)
        if name:
            check_architecture(name, config.model_config.architectures, config.model_config.model)
        return config

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_plugin)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_plugin)
    EngineArgs.create_engine_config = create_engine_config_checked
