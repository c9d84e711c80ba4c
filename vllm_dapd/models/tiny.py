"""Tiny random checkpoints in the exact LLaDA / Dream / LLaDA2 directory layouts, for tests and parity fixtures.

Each directory holds what the real Hugging Face repositories hold: ``config.json`` (real field
names, ``auto_map`` to the remote code we never run), sharded safetensors with
``model.safetensors.index.json``, a small tokenizer (LLaDA: ``tokenizer.json``; Dream:
``vocab.json`` + ``merges.txt``) with the special tokens at ids after the regular vocabulary, a chat
template, and ``generation_config.json``. Deterministic in ``seed``; a few hundred KB by default.
Importable without vLLM (the parity script runs it under transformers 4.57).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from vllm_dapd.models.configs import DreamConfig, LLaDA2MoeConfig, LLaDAConfig
from vllm_dapd.models.dream import dream_layout, dream_spec
from vllm_dapd.models.llada import llada_layout, llada_spec
from vllm_dapd.models.llada2 import llada2_layout, llada2_spec
from vllm_dapd.models.loading import write_shards
from vllm_dapd.models.tokenizer import CHATML_TEMPLATE, LLADA_CHAT_TEMPLATE

LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
LLADA2_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|role_end|>", "<|mask|>", "<role>", "</role>"]

_CORPUS = [
    "The capital of France is Paris. The capital of England is London.",
    "Lily can run 12 kilometers per hour for 4 hours. How many kilometers can she run in 8 hours?",
    "def add(a, b):\n    return a + b\n",
    "A masked diffusion language model fills a canvas of masks in any order, a few tokens per step.",
    "You are a helpful assistant. Answer the question step by step, then give the final answer.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) [ ] { } , . ; : ! ?",
]


def _bpe(vocab_size: int, qwen_pretokenizer: bool) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen_pretokenizer:  # the split Qwen2Tokenizer applies before byte-level BPE
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok


def _random_weights(layout: dict[str, Any], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Scaled so activations stay O(1) and softmaxes are neither flat nor one-hot."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(layout):
        shape = layout[name].shape
        if len(shape) == 1 and ("norm" in name or name.endswith(("ln_f.weight",))):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # q/k/v bias
            t = 0.1 * torch.randn(shape, generator=gen)
        elif "embed" in name or "wte" in name:
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        out[name] = t.to(dtype).contiguous()
    return out


def _dump(path: str, name: str, obj: dict[str, Any]) -> None:
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _added_tokens(specials: list[str], first_id: int) -> dict[str, Any]:
    return {str(first_id + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True} for i, t in enumerate(specials)}


def make_tiny_llada(path: str, seed: int = 0, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                    n_kv_heads: int | None = None, mlp_hidden_size: int = 128, vocab: int = 310,
                    num_shards: int = 2, weight_tying: bool = False, dtype: torch.dtype = torch.float32,
                    vocab_rows: int | None = None) -> str:
    """Write a random LLaDA-8B-Instruct-layout checkpoint to ``path`` and return it.

    ``vocab_rows`` pads the embedding and head to that many rows (default: the tokenizer size rounded
    up to 16); the tokenizer stays small, as LLaDA-8B's 126464 rows exceed its tokenizer.
    """
    os.makedirs(path, exist_ok=True)
    tok = _bpe(vocab - len(LLADA_SPECIALS), qwen_pretokenizer=False)
    tok.add_special_tokens(LLADA_SPECIALS)
    ids = {t: tok.token_to_id(t) for t in LLADA_SPECIALS}
    rows = 16 * math.ceil(tok.get_vocab_size() / 16)  # like 126464 > tokenizer size in the 8B model
    if vocab_rows is not None:
        if vocab_rows < tok.get_vocab_size():
            raise ValueError(f"vocab_rows: {vocab_rows} < tokenizer size {tok.get_vocab_size()}")
        rows = vocab_rows
    config = dict(
        activation_type="silu", alibi=False, alibi_bias_max=8.0, architectures=["LLaDAModelLM"],
        attention_dropout=0.0, attention_layer_norm=False, attention_layer_norm_with_affine=True,
        auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                  "AutoModel": "modeling_llada.LLaDAModelLM"},
        bias_for_layer_norm=False, block_group_size=1, block_type="llama", d_model=d_model,
        embedding_dropout=0.0, embedding_size=rows, eos_token_id=ids["<|endoftext|>"], flash_attention=False,
        include_bias=False, include_qkv_bias=False, init_cutoff_factor=None, init_device="meta",
        init_fn="mitchell", init_std=0.02, input_emb_norm=False, layer_norm_type="rms",
        layer_norm_with_affine=True, mask_token_id=ids["<|mdm_mask|>"], max_sequence_length=4096,
        mlp_hidden_size=mlp_hidden_size, mlp_ratio=4, model_type="llada", multi_query_attention=None,
        n_heads=n_heads, n_kv_heads=n_kv_heads if n_kv_heads is not None else n_heads, n_layers=n_layers,
        pad_token_id=ids["<|endoftext|>"], precision="amp_bf16", residual_dropout=0.0, rms_norm_eps=1e-5,
        rope=True, rope_full_precision=True, rope_theta=500000.0, scale_logits=False,
        torch_dtype=str(dtype).removeprefix("torch."), use_cache=False, vocab_size=rows,
        weight_tying=weight_tying,
    )
    _dump(path, "config.json", config)
    _dump(path, "generation_config.json", {"_from_model_config": True, "bos_token_id": ids["<|startoftext|>"],
                                           "eos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"]})
    layout = llada_layout(llada_spec(LLaDAConfig(**config)))
    write_shards(path, _random_weights(layout, seed, dtype), num_shards)
    tok.save(os.path.join(path, "tokenizer.json"))
    _dump(path, "tokenizer_config.json", {
        "added_tokens_decoder": _added_tokens(LLADA_SPECIALS, ids[LLADA_SPECIALS[0]]),
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": LLADA_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"})
    return path


def make_tiny_dream(path: str, seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 2,
                    num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
                    vocab: int = 310, num_shards: int = 2, tie_word_embeddings: bool = False,
                    dtype: torch.dtype = torch.float32) -> str:
    """Write a random Dream-v0-Instruct-7B-layout checkpoint to ``path`` and return it."""
    os.makedirs(path, exist_ok=True)
    tok = _bpe(vocab - len(DREAM_SPECIALS), qwen_pretokenizer=True)
    n_regular = tok.get_vocab_size()
    ids = {t: n_regular + i for i, t in enumerate(DREAM_SPECIALS)}
    rows = 16 * math.ceil((n_regular + len(DREAM_SPECIALS)) / 16)  # Dream pads 151667 -> 152064
    config = dict(
        architectures=["DreamModel"], attention_dropout=0.0,
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], hidden_act="silu",
        hidden_size=hidden_size, initializer_range=0.02, intermediate_size=intermediate_size,
        mask_token_id=ids["<|mask|>"], max_position_embeddings=131072, max_window_layers=num_hidden_layers,
        model_type="Dream", num_attention_heads=num_attention_heads, num_hidden_layers=num_hidden_layers,
        num_key_value_heads=num_key_value_heads, pad_token_id=ids["<|endoftext|>"], rms_norm_eps=1e-6,
        rope_scaling=None, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=tie_word_embeddings,
        torch_dtype=str(dtype).removeprefix("torch."), use_cache=False, use_sliding_window=False,
        vocab_size=rows,
    )
    _dump(path, "config.json", config)
    _dump(path, "generation_config.json", {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
                                           "pad_token_id": ids["<|endoftext|>"], "mask_token_id": ids["<|mask|>"]})
    layout = dream_layout(dream_spec(DreamConfig(**config)))
    write_shards(path, _random_weights(layout, seed, dtype), num_shards)
    tok.model.save(path)  # vocab.json + merges.txt (regular tokens only, as Qwen2 ships them)
    _dump(path, "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": _added_tokens(DREAM_SPECIALS, n_regular),
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|beginoftext|>", "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "mask_token": "<|mask|>", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "DreamTokenizer",
        "unk_token": None})
    return path


def make_tiny_llada2(path: str, seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 3,
                     num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
                     moe_intermediate_size: int = 32, num_experts: int = 8, num_experts_per_tok: int = 2,
                     n_group: int = 4, topk_group: int = 2, num_shared_experts: int | None = 1,
                     first_k_dense_replace: int = 1, use_qkv_bias: bool = False, use_bias: bool = False,
                     vocab: int = 310, num_shards: int = 2, tie_word_embeddings: bool = False,
                     dtype: torch.dtype = torch.float32, block_length: int | None = None) -> str:
    """Write a random LLaDA2.0-mini-layout checkpoint (``llada2_moe``) to ``path`` and return it.
    ``block_length``: written to config.json (the block size the model declares; default 32).

    Same field values as the real config where they are not sizes (qk-norm, partial rotary 0.5,
    sigmoid router with expert bias, grouped top-k, routed scaling 2.5, a shared expert, the first
    layer dense); the expert biases are random, so they change the routing. The tokenizer is a small
    byte-level BPE with LLaDA2's special-token names after the regular vocabulary (no chat template).
    """
    os.makedirs(path, exist_ok=True)
    tok = _bpe(vocab - len(LLADA2_SPECIALS), qwen_pretokenizer=False)
    tok.add_special_tokens(LLADA2_SPECIALS)
    ids = {t: tok.token_to_id(t) for t in LLADA2_SPECIALS}
    rows = 16 * math.ceil(tok.get_vocab_size() / 16)
    config = dict(
        architectures=["LLaDA2MoeModelLM"], attention_dropout=0.0,
        auto_map={"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                  "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                  "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        embedding_dropout=0.0, eos_token_id=ids["<|endoftext|>"], first_k_dense_replace=first_k_dense_replace,
        head_dim=hidden_size // num_attention_heads, hidden_act="silu", hidden_size=hidden_size,
        initializer_range=0.02, intermediate_size=intermediate_size, mask_token_id=ids["<|mask|>"],
        max_position_embeddings=4096, max_window_layers=num_hidden_layers, model_type="llada2_moe",
        moe_intermediate_size=moe_intermediate_size, moe_router_enable_expert_bias=True, n_group=n_group,
        norm_head=False, norm_topk_prob=True, num_attention_heads=num_attention_heads, num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok, num_hidden_layers=num_hidden_layers,
        num_key_value_heads=num_key_value_heads, num_shared_experts=num_shared_experts, output_dropout=0.0,
        output_router_logits=False, pad_token_id=ids["<|endoftext|>"], partial_rotary_factor=0.5,
        rms_norm_eps=1e-6, rope_scaling=None, rope_theta=600000.0, routed_scaling_factor=2.5,
        router_dtype="fp32", score_function="sigmoid", tie_word_embeddings=tie_word_embeddings,
        topk_group=topk_group, torch_dtype=str(dtype).removeprefix("torch."), use_bias=use_bias, use_cache=False,
        use_qk_norm=True, use_qkv_bias=use_qkv_bias, use_sliding_window=False, vocab_size=rows,
    )
    if block_length is not None:
        config["block_length"] = block_length
    _dump(path, "config.json", config)
    _dump(path, "generation_config.json", {"bos_token_id": ids["<|startoftext|>"], "eos_token_id": ids["<|endoftext|>"],
                                           "pad_token_id": ids["<|endoftext|>"]})
    layout = llada2_layout(llada2_spec(LLaDA2MoeConfig(**config)))
    write_shards(path, _random_weights(layout, seed, dtype), num_shards)
    tok.save(os.path.join(path, "tokenizer.json"))
    _dump(path, "tokenizer_config.json", {
        "added_tokens_decoder": _added_tokens(LLADA2_SPECIALS, ids[LLADA2_SPECIALS[0]]),
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>", "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    return path
