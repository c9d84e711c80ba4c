"""Through vLLM: registration without remote code, and a load by vLLM's DefaultModelLoader (the
tensor-parallel layer classes, world size 1 on CPU) that gives the same logits as the plain path."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from vllm_dapd.models import ARCHITECTURES, register_models
from vllm_dapd.models.loading import load_model


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's distributed state (gloo, world size 1), set up once for this module."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    register_models()
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
    yield
    destroy_model_parallel()
    destroy_distributed_environment()


def _vllm_load(path: str):
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import DefaultModelLoader

    model_config = ModelConfig(model=path, tokenizer=path, dtype="float32", skip_tokenizer_init=True,
                               max_model_len=256)
    vllm_config = VllmConfig(model_config=model_config, load_config=LoadConfig(), device_config=DeviceConfig("cpu"))
    with set_current_vllm_config(vllm_config):
        if not torch.accelerator.is_available():  # vLLM's loader empties an accelerator cache
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.accelerator, "empty_cache", lambda: None)
                return DefaultModelLoader(vllm_config.load_config).load_model(vllm_config=vllm_config,
                                                                              model_config=model_config)
        return DefaultModelLoader(vllm_config.load_config).load_model(vllm_config=vllm_config,
                                                                      model_config=model_config)


def test_registration_is_idempotent_and_offline(tiny_dirs):
    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry

    import vllm_dapd.plugin as plugin

    register_models()
    plugin.register()
    register_models()
    archs = ModelRegistry.get_supported_archs()
    assert set(ARCHITECTURES) <= set(archs)
    for name, cls in (("llada", "LLaDAConfig"), ("dream", "DreamConfig")):
        cfg = AutoConfig.from_pretrained(tiny_dirs[name], trust_remote_code=False)
        assert type(cfg).__name__ == cls
        tok = AutoTokenizer.from_pretrained(tiny_dirs[name], trust_remote_code=False)
        assert tok.convert_ids_to_tokens(cfg.mask_token_id) in ("<|mdm_mask|>", "<|mask|>")


@pytest.mark.parametrize("name,cls", [("llada", "LLaDAForDiffusionLM"), ("dream", "DreamForDiffusionLM")])
def test_vllm_loader_matches_plain_path(name, cls, vllm_env, tiny_dirs, tiny_models, parity):
    model = _vllm_load(tiny_dirs[name])
    assert type(model).__name__ == cls and model.factory.vllm
    assert "layers.0.qkv.proj.weight" in dict(model.named_parameters())  # fused TP layer
    ids = torch.stack([parity[name][f"logits.{0}.input_ids"][:14], parity[name][f"logits.{1}.input_ids"][:14]])
    with torch.no_grad():
        got = model(ids, attention_span=(6, 14), attention_layers=[0, -1])
    with torch.no_grad():
        want = tiny_models[name](ids, attention_span=(6, 14), attention_layers=[0, -1])
    assert (got.logits - want.logits).abs().max().item() <= 1e-5
    assert (got.attention - want.attention).abs().max().item() <= 1e-5
    # vLLM's flat convention: input_ids [T], positions [T]
    with torch.no_grad():
        flat = model(ids[0], positions=torch.arange(14)).logits
    assert (flat - want.logits[0]).abs().max().item() <= 1e-5


def test_vllm_loader_tied_head_matches_plain_path(vllm_env, tmp_path):
    from vllm_dapd.models.tiny import make_tiny_llada

    path = make_tiny_llada(str(tmp_path / "tied"), weight_tying=True)
    model, plain = _vllm_load(path), load_model(path)
    assert model.head is None
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max().item() <= 1e-4  # logits ~ 10 here


def test_vllm_loader_error_names_the_key(vllm_env, tmp_path):
    from safetensors.torch import load_file, save_file

    from vllm_dapd.models.loading import shard_files
    from vllm_dapd.models.tiny import make_tiny_dream

    path = make_tiny_dream(str(tmp_path / "dream"))
    key = "model.layers.1.mlp.up_proj.weight"
    for file in shard_files(path):
        t = load_file(file)
        if key in t:
            t[key] = t[key][:, :-2].contiguous()
            save_file(t, file)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _vllm_load(path)


def test_vllm_loader_llada2_matches_plain_path(vllm_env, tiny_dirs, tiny_models, parity):
    """LLaDA2 through vLLM's loader (fused QKV TP layer fed the fused checkpoint tensor, replicated
    experts): the plain path's logits, bidirectional and block-causal."""
    model = _vllm_load(tiny_dirs["llada2"])
    assert type(model).__name__ == "LLaDA2ForDiffusionLM" and model.factory.vllm
    assert "layers.0.qkv.proj.weight" in dict(model.named_parameters())
    ids = torch.stack([parity["llada2"][f"logits.{i}.input_ids"][:15] for i in range(2)])
    for block in (None, 4):
        with torch.no_grad():
            got = model(ids, block_size=block).logits
            want = tiny_models["llada2"](ids, block_size=block).logits
        assert (got - want).abs().max().item() <= 1e-5


def test_engine_config_declares_block_causal_attention(vllm_env, tiny_dirs):
    """LLaDA2 at config time: its block size (config.json's, default 32) is written once for every
    engine process, becomes the server's block_length with cache mode prefix, vLLM's prefix caching
    stays on (off for bidirectional models); a server block_length the model cannot take fails."""
    from vllm.config import ModelConfig, VllmConfig

    import vllm_dapd.plugin as plugin

    plugin.register()

    def config(name, extra=None):
        model_config = ModelConfig(model=tiny_dirs[name], tokenizer=tiny_dirs[name], dtype="float32",
                                   skip_tokenizer_init=True, max_model_len=256)
        return VllmConfig(model_config=model_config, additional_config=extra or {})

    llada2 = config("llada2")
    assert llada2.additional_config["dapd_attention"] == {"kind": "block_causal", "block_size": 32}
    assert llada2.additional_config["dapd"]["block_length"] == 32
    assert llada2.additional_config["dapd"]["cache_mode"] == "prefix"
    assert llada2.cache_config.enable_prefix_caching
    llada = config("llada")
    assert llada.additional_config["dapd_attention"] == {"kind": "bidirectional", "block_size": None}
    assert not llada.cache_config.enable_prefix_caching
    with pytest.raises(ValueError, match="block_length: the served model is block-causal with block size 32"):
        config("llada2", {"dapd": {"block_length": 8}})

