"""Tokenizers and chat templates for LLaDA and Dream, loaded offline with standard classes.

- LLaDA ships a fast tokenizer (``tokenizer.json``) and a Llama-3-style chat template
  (``<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>``, bos first).
- Dream ships Qwen2's byte-level BPE as ``vocab.json`` + ``merges.txt`` with
  ``tokenizer_class: DreamTokenizer`` (remote code, a copy of Qwen2Tokenizer); we load it with
  transformers' own ``Qwen2Tokenizer`` and the ChatML template.
A checkpoint's own ``chat_template`` (tokenizer_config.json or chat_template.jinja) always wins;
the constants below are the fallback and what the tiny checkpoints ship.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

# GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json chat_template.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5 / Dream ChatML (tool-calling branches left out), default system prompt as upstream.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(path: str) -> Any:
    """Tokenizer of a LLaDA, Dream or LLaDA2 checkpoint directory, offline, without remote code."""
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    model_type = _read_json(os.path.join(path, "config.json")).get("model_type")
    kwargs = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
              if isinstance(cfg.get(k), str)}
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        tok = PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    elif os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt")):
        tok = DreamTokenizer.from_pretrained(path, **kwargs)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            tok.chat_template = f.read()
    elif cfg.get("chat_template"):
        tok.chat_template = cfg["chat_template"]
    elif getattr(tok, "chat_template", None) is None:
        tok.chat_template = CHATML_TEMPLATE if model_type == "Dream" else LLADA_CHAT_TEMPLATE
    return tok



class DreamTokenizer(Qwen2Tokenizer):
    """Dream's ``tokenizer_class`` name backed by transformers' own Qwen2 byte-level BPE.

    Upstream's ``tokenization_dream.py`` is a verbatim copy of ``Qwen2Tokenizer`` shipped as remote
    code; registering this same-named local class lets ``AutoTokenizer`` (and so vLLM) open Dream
    checkpoints without ``trust_remote_code``.
    """


def register_tokenizers() -> None:
    """Register ``DreamTokenizer`` with AutoTokenizer for ``DreamConfig`` (idempotent)."""
    from transformers import AutoTokenizer

    from vllm_dapd.models.configs import DreamConfig

    AutoTokenizer.register(DreamConfig, tokenizer_class=DreamTokenizer, exist_ok=True)


END_OF_TURN = ("<|eot_id|>", "<|im_end|>")  # LLaDA (Llama-3 style), Dream (ChatML)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the decoding loop and the server need, read, never hard-coded.

    LLaDA-8B: mask 126336, eos 126081 (``<|endoftext|>``), end of turn 126348 (``<|eot_id|>``).
    """

    mask: int
    eos: int
    pad: int | None
    stop: tuple[int, ...]  # an answer ends at any of these: eos(s) and the chat end-of-turn token


def special_ids(config: Any, tokenizer: Any) -> SpecialIds:
    """From a model config (``mask_token_id``, ``eos_token_id``, ``pad_token_id``) and its tokenizer."""
    mask = getattr(config, "mask_token_id", None)
    if mask is None:
        raise ValueError("mask_token_id: missing from the model config")
    eos = getattr(config, "eos_token_id", None)
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos if eos is not None else tokenizer.eos_token_id]
    if eos_ids[0] is None:
        raise ValueError("eos_token_id: missing from the model config and the tokenizer")
    stop = list(eos_ids)
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN:
        if token in vocab and vocab[token] not in stop:
            stop.append(vocab[token])
    pad = getattr(config, "pad_token_id", None)
    return SpecialIds(mask=int(mask), eos=int(eos_ids[0]), pad=None if pad is None else int(pad),
                      stop=tuple(int(t) for t in stop))
