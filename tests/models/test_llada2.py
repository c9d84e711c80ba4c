"""LLaDA2 (``llada2_moe``): logits and block-diffusion decoding equal the reference remote code
(fixtures recorded by tools/make_llada2_parity_fixtures.py on the same tiny checkpoint), the KV of
finished blocks is exact, and the header-only layout check knows the family."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_dapd.decoding.block_diffusion import block_diffusion_generate, transfer_schedule
from vllm_dapd.models.loading import check_checkpoint, load_model, shard_files
from vllm_dapd.models.tiny import make_tiny_llada2

TOL = 1e-4
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "parity")


def manifest() -> dict:
    with open(os.path.join(FIXTURES, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llada2"]


@pytest.fixture(scope="module")
def fx(parity):
    return parity["llada2"]


def _check_rows(logits: torch.Tensor, fx: dict, key: str) -> None:
    cols = fx[f"{key}.cols"]
    assert (logits[:, : cols.shape[1]] - cols).abs().max().item() <= TOL
    assert (torch.logsumexp(logits, -1) - fx[f"{key}.lse"]).abs().max().item() <= TOL
    assert torch.equal(logits.argmax(-1), fx[f"{key}.argmax"])


def test_bidirectional_logits_match_reference(model, fx):
    """The reference forward without a mask (bidirectional), fp32."""
    for i in range(2):
        with torch.no_grad():
            logits = model(fx[f"logits.{i}.input_ids"][None]).logits[0]
        _check_rows(logits, fx, f"logits.{i}")


def test_block_causal_logits_match_reference(model, fx):
    """The reference forward with the block-causal mask its ``generate`` builds, fp32."""
    block = manifest()["llada2"]["mask_block"]
    for i in range(2):
        with torch.no_grad():
            logits = model(fx[f"logits.{i}.input_ids"][None], block_size=block).logits[0]
        _check_rows(logits, fx, f"block.{i}")
        with torch.no_grad():  # and the mask matters: bidirectional logits differ here
            assert (model(fx[f"logits.{i}.input_ids"][None]).logits[0] - logits).abs().max() > 1e-2


def test_left_padded_block_causal_batch_matches_reference(model, fx):
    """Blocks are counted from each row's first real token when the batch is left-padded."""
    block = manifest()["llada2"]["mask_block"]
    seqs = [fx[f"logits.{i}.input_ids"] for i in range(2)]
    T = max(len(s) for s in seqs)
    ids = torch.ones(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):], mask[b, T - len(s):] = s, True
    with torch.no_grad():
        logits = model(ids, key_padding_mask=mask, block_size=block).logits
    for b in range(2):
        _check_rows(logits[b][mask[b]], fx, f"block.{b}")


def test_bf16_logits_follow_the_reference(tiny_dirs, fx):
    """bf16 end to end against the reference loaded in bf16 (router in fp32 in both). Bit-exact on
    the recording machine; other CPU kernels round bf16 GEMMs differently, and one rounding can
    flip a routing choice, so the test asks for: the same top token on nearly every row and
    log-sum-exps within bf16 noise."""
    bf16 = load_model(tiny_dirs["llada2"], dtype=torch.bfloat16)
    for i in range(2):
        with torch.no_grad():
            logits = bf16(fx[f"logits.{i}.input_ids"][None]).logits[0].float()
        agree = (logits.argmax(-1) == fx[f"bf16.{i}.argmax"]).float().mean().item()
        assert agree >= 0.9
        assert (torch.logsumexp(logits, -1) - fx[f"bf16.{i}.lse"]).abs().median().item() <= 0.05


@pytest.mark.parametrize("kv_cache", [False, True])
def test_block_diffusion_generate_matches_reference(model, fx, kv_cache):
    """LLaDA2's ``generate`` (temperature 0, threshold / low-confidence) token for token, one prompt
    at a time and as a batch of one; with the exact block KV cache too."""
    m = manifest()["llada2"]
    for case in m["cases"]:
        for i in range(2):
            out = block_diffusion_generate(model, fx[f"prompt.{i}"][None], gen_length=case["gen_length"],
                                           block_length=case["block_length"], steps=case["steps"],
                                           threshold=case["threshold"], minimal_topk=case["minimal_topk"],
                                           eos_id=case["eos_id"] if case["eos_id"] is not None else m["eos_token_id"],
                                           kv_cache=kv_cache)
            want = fx[f"gen.{case['name']}.{i}.output"]
            assert torch.equal(out.answers[0], want), (case["name"], i)
            if len(want) < case["gen_length"]:  # stopped at eos: no forward spent on a later block
                P, bl = len(fx[f"prompt.{i}"]), case["block_length"]
                blocks = (P + len(want) - 1) // bl - P // bl + 1
                assert out.nfe[0] <= blocks * min(case["steps"], case["gen_length"] // case["minimal_topk"])


def test_batched_rows_decode_as_alone(model, fx):
    """Rows of equal prompt length decode in one batch exactly as alone (a row that meets eos freezes)."""
    gen = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, manifest()["llada2"]["mask_token_id"] - 3, (3, 9), generator=gen)
    kw = dict(gen_length=12, block_length=4, steps=4, threshold=0.05, eos_id=manifest()["llada2"]["eos_token_id"])
    batch = block_diffusion_generate(model, prompts, **kw)
    for b in range(3):
        alone = block_diffusion_generate(model, prompts[b:b + 1], **kw)
        assert torch.equal(batch.answers[b], alone.answers[0])
        assert batch.nfe[b] == alone.nfe[0]


def test_cached_block_kv_equals_recomputed(model, fx):
    """Block-causal: a finished block's keys/values do not depend on anything after it, so a step
    feeding only the active block over the cached prefix gives the full forward's logits."""
    ids = fx["logits.1.input_ids"][None]  # 21 tokens: blocks of 4, the last one partial
    with torch.no_grad():
        full = model(ids, block_size=4).logits
        cache = model(ids[:, :16], block_size=4, use_cache=True).past_key_values
        tail = model(ids[:, 16:], block_size=4, past_key_values=cache).logits
    assert (tail - full[:, 16:]).abs().max().item() <= 1e-5


def test_transfer_schedule():
    assert transfer_schedule(8, 3) == [3, 3, 2]
    assert transfer_schedule(4, 8) == [1, 1, 1, 1, 0, 0, 0, 0]
    assert sum(transfer_schedule(32, 32)) == 32


def test_generate_rejects_bad_arguments(model, tiny_models):
    p = torch.zeros(1, 3, dtype=torch.long)
    for kw, name in ((dict(gen_length=0), "gen_length"), (dict(gen_length=4, block_length=0), "block_length"),
                     (dict(gen_length=4, minimal_topk=5), "minimal_topk"),
                     (dict(gen_length=4, threshold=float("nan")), "threshold")):
        with pytest.raises(ValueError, match=f"^{name}"):
            block_diffusion_generate(model, p, **kw)
    with pytest.raises(ValueError, match="^model: declares no block-causal"):
        block_diffusion_generate(tiny_models["llada"], p, gen_length=4)


def test_block_length_defaults_to_the_models_block_size(model, fx):
    """block_length None: the model's declared block size (32), the reference's default."""
    case = next(c for c in manifest()["llada2"]["cases"] if c["name"] == "b32_one_block")
    out = block_diffusion_generate(model, fx["prompt.0"][None], gen_length=case["gen_length"], steps=case["steps"],
                                   threshold=case["threshold"], eos_id=manifest()["llada2"]["eos_token_id"])
    assert torch.equal(out.answers[0], fx["gen.b32_one_block.0.output"])


def test_model_declares_block_causal_structure(model, tiny_dirs):
    with open(os.path.join(tiny_dirs["llada2"], "config.json")) as f:
        cfg = json.load(f)
    assert model.attention_structure.kind == "block_causal"
    assert model.attention_structure.block_size == 32
    assert model.mask_token_id == cfg["mask_token_id"] and model.logits_shift == 0
    from vllm_dapd.models.dream import Dream
    from vllm_dapd.models.llada import LLaDA

    assert LLaDA.attention_structure.kind == Dream.attention_structure.kind == "bidirectional"


# ---------------------------------------------------------------- layout


def _tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in shard_files(path):
        out.update(load_file(f))
    return out


def test_layout_check_passes_and_names_problems(tiny_dirs, tmp_path):
    src = tiny_dirs["llada2"]
    assert check_checkpoint(src) == []
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    for f in shard_files(bad):
        os.remove(f)
    os.remove(os.path.join(bad, "model.safetensors.index.json"))
    t = _tensors(src)
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    t["model.layers.1.mlp.gate.expert_bias"] = torch.zeros(7)
    t["model.layers.0.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)  # layer 0 is dense
    save_file(t, os.path.join(bad, "model.safetensors"))
    problems = check_checkpoint(bad)
    assert any(p.startswith("model.layers.2.mlp.experts.5.up_proj.weight: missing") for p in problems)
    assert any(p.startswith("model.layers.1.mlp.gate.expert_bias: expected shape (8,)") for p in problems)
    assert any(p.startswith("model.layers.0.mlp.experts.0.up_proj.weight: unexpected") for p in problems)
    assert len(problems) == 3


def test_check_checkpoint_tool_reports_llada2(tiny_dirs, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_checkpoint", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "check_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([tiny_dirs["llada2"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llada2_moe: 2 shard(s)") and "OK" in out


def test_biases_and_no_shared_expert_variant_loads(tmp_path):
    """use_qkv_bias / use_bias add the bias tensors, num_shared_experts null drops the shared expert;
    the loaded model uses them (a bias changes the logits)."""
    path = make_tiny_llada2(str(tmp_path / "v"), seed=3, use_qkv_bias=True, use_bias=True, num_shared_experts=None,
                            num_hidden_layers=2)
    names = set(_tensors(path))
    assert "model.layers.1.attention.query_key_value.bias" in names
    assert "model.layers.0.attention.dense.bias" in names
    assert not any("shared_experts" in n for n in names)
    assert check_checkpoint(path) == []
    m = load_model(path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        before = m(ids).logits
        m.layers[0].attn_out.bias.zero_()
        assert (m(ids).logits - before).abs().max() > 1e-3


@pytest.mark.parametrize("field,value", [("n_group", 3), ("topk_group", 5), ("score_function", "softmax"),
                                         ("norm_topk_prob", False), ("num_key_value_heads", 0),
                                         ("norm_head", True)])
def test_unsupported_config_is_named(tmp_path, tiny_dirs, field, value):
    path = str(tmp_path / "c")
    shutil.copytree(tiny_dirs["llada2"], path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg[field] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=f"^{field}: unsupported value"):
        load_model(path)
