"""The demo model's word-level tokenizer, in the LLaDA layout, and fast encoding for training.

Why word level: every task token (a digit, a key, half a city name) is one token, so "one token
per step" means one answer word per step and coupled words are separate positions. The tokenizer
is a real ``tokenizer.json`` (``WordLevel`` model) that ``PreTrainedTokenizerFast`` and vLLM load,
with LLaDA's special tokens after the regular words and LLaDA-8B-Instruct's chat template. Its
pre-tokenizer keeps runs of newlines (the template's ``\\n\\n``), single digits and other
non-space runs, and drops spaces; decoding joins tokens with single spaces, which is exactly the
task text format (``"sort 3 1 2"``; ``"sort 312"`` encodes the same).

Training builds ids without the tokenizer (``Vocab.prompt_ids``) because rendering the Jinja
template per example is slow; tests pin it equal to ``apply_chat_template``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property

from vllm_dapd.demo.tasks import CANVAS, all_words
from vllm_dapd.models.tiny import LLADA_SPECIALS
from vllm_dapd.models.tokenizer import LLADA_CHAT_TEMPLATE

UNK = "<unk>"
NEWLINES = "\n\n"
PRETOKENIZE = r"\n+|[0-9]|[A-Za-z]+|[^\sA-Za-z0-9]"


@dataclass(frozen=True)
class Vocab:
    words: tuple[str, ...]  # regular tokens, ids 0..len-1; specials follow

    @classmethod
    def build(cls, words: list[str] | None = None) -> "Vocab":
        """The demo tasks' vocabulary, or one over ``words`` (another task suite's regular tokens)."""
        return cls(tuple([UNK, NEWLINES, "user", "assistant"] + (all_words() if words is None else list(words))))

    @cached_property
    def ids(self) -> dict[str, int]:
        table = {w: i for i, w in enumerate(self.words)}
        table.update({s: len(self.words) + i for i, s in enumerate(LLADA_SPECIALS)})
        return table

    @property
    def size(self) -> int:
        return len(self.words) + len(LLADA_SPECIALS)

    def special(self, name: str) -> int:
        return len(self.words) + LLADA_SPECIALS.index(name)

    @property
    def mask_id(self) -> int:
        return self.special("<|mdm_mask|>")

    def encode(self, text: str) -> list[int]:
        table = self.ids
        return [table.get(w, table[UNK]) for w in text.split()]

    def prompt_ids(self, content: str) -> list[int]:
        """Ids of the chat-templated user turn + assistant header (``apply_chat_template`` output)."""
        s = self.special
        head = [s("<|startoftext|>"), s("<|start_header_id|>"), self.ids["user"], s("<|end_header_id|>"),
                self.ids[NEWLINES]]
        tail = [s("<|eot_id|>"), s("<|start_header_id|>"), self.ids["assistant"], s("<|end_header_id|>"),
                self.ids[NEWLINES]]
        return head + self.encode(content) + tail

    def answer_ids(self, answer: str, canvas: int = CANVAS) -> list[int]:
        """Answer + ``<|eot_id|>`` + ``<|endoftext|>`` padding to ``canvas`` tokens (LLaDA SFT)."""
        ids = self.encode(answer) + [self.special("<|eot_id|>")]
        if len(ids) > canvas:
            raise ValueError(f"canvas: answer {answer!r} needs {len(ids)} tokens, canvas has {canvas}")
        return ids + [self.special("<|endoftext|>")] * (canvas - len(ids))


def write_tokenizer(path: str, vocab: Vocab) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (LLaDA special tokens and chat template)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab.words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="removed", invert=True)
    tok.add_special_tokens(list(LLADA_SPECIALS))
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    added = {str(vocab.special(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for t in LLADA_SPECIALS}
    config = {"added_tokens_decoder": added, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": UNK, "chat_template": LLADA_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
