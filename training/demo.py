"""Train the demo model: ``python training/demo.py --out vllm_dapd/demo/checkpoint``.

A development tool, not part of the installed package (its checkpoints are: package data).

A tiny LLaDA (exact ``LLaDAModelLM`` layout, word-level tokenizer) trained from scratch with
LLaDA's SFT objective (Nie et al. 2025, "Large Language Diffusion Models", Sec. 2.3): the prompt
is never masked; each answer token (including the ``<|eot_id|>``/``<|endoftext|>`` padding, as in
LLaDA SFT) is masked independently with probability ``t ~ U(eps, 1)`` drawn per example; the loss
is the cross-entropy on masked positions weighted by ``1/t``, averaged over answer tokens.

Every optimiser step sees one sub-batch of each task (prompts within a task share a length, so no
padding is needed). Deterministic for a given ``--seed`` (fixed step count; ``--max-minutes`` is a
wall-clock safety stop, and ``training.json`` records the step it stopped at so ``--stop-step``
replays it). Sized for a shared 2-core CPU: 4000 steps take 15-35 minutes depending on load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from vllm_dapd.demo.evaluate import accuracy, evaluate
from vllm_dapd.demo import tasks as demo_tasks
from vllm_dapd.demo.tasks import Item
from vllm_dapd.demo.vocab import Vocab, write_tokenizer
from vllm_dapd.models.configs import LLaDAConfig
from vllm_dapd.models.llada import LLaDA
from vllm_dapd.models.loading import save_model


@dataclass(frozen=True)
class Suite:
    """A task suite to train on: the demo's, or another (``training/depbench.py``)."""

    tasks: tuple[str, ...]
    canvas: int  # answer tokens + <|eot_id|> + padding
    words: tuple[str, ...]  # regular vocabulary
    train_stream: Callable[[str, int], Iterator[Item]]  # (task, seed) -> endless training items
    held_out: Callable[[str, int], list[Item]]  # (task, n) -> fixed evaluation items
    default_out: str

    def vocab(self) -> Vocab:
        return Vocab.build(list(self.words))


DEMO = Suite(tuple(demo_tasks.TASKS), demo_tasks.CANVAS, tuple(demo_tasks.all_words()), demo_tasks.train_stream,
             demo_tasks.held_out, "vllm_dapd/demo/checkpoint")


def llada_config(vocab: Vocab, d_model: int, n_layers: int, n_heads: int, mlp_hidden: int) -> LLaDAConfig:
    """LLaDA-8B-Instruct's config fields at demo size (same values as ``models/tiny.py``)."""
    rows = 16 * math.ceil(vocab.size / 16)  # embedding rows padded past the tokenizer, like the 8B model
    eos = vocab.special("<|endoftext|>")
    return LLaDAConfig(
        activation_type="silu", alibi=False, attention_dropout=0.0, attention_layer_norm=False,
        auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                  "AutoModel": "modeling_llada.LLaDAModelLM"},
        bias_for_layer_norm=False, block_group_size=1, block_type="llama", d_model=d_model,
        embedding_dropout=0.0, embedding_size=rows, eos_token_id=eos, flash_attention=False,
        include_bias=False, include_qkv_bias=False, init_device="meta", init_fn="mitchell",
        input_emb_norm=False, layer_norm_type="rms", layer_norm_with_affine=True,
        mask_token_id=vocab.mask_id, max_sequence_length=4096, mlp_hidden_size=mlp_hidden, mlp_ratio=4,
        n_heads=n_heads, n_kv_heads=n_heads, n_layers=n_layers, pad_token_id=eos, precision="amp_bf16",
        residual_dropout=0.0, rms_norm_eps=1e-5, rope=True, rope_full_precision=True, rope_theta=10000.0,
        scale_logits=False, torch_dtype="float32", use_cache=False, vocab_size=rows, weight_tying=False)


def init_weights(model: torch.nn.Module, seed: int, n_layers: int) -> None:
    """GPT-2-style init: N(0, 0.02), output projections scaled by 1/sqrt(2 * layers), norms 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            std = 0.02 / math.sqrt(2 * n_layers) if ("attn_out" in name or "ffn_out" in name) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_batch(vocab: Vocab, items: list[Item], rng: random.Random, canvas: int = demo_tasks.CANVAS
               ) -> tuple[torch.Tensor, int]:
    """[B, P + canvas] clean sequences (a random correct answer per item) and the prompt length P."""
    rows = [vocab.prompt_ids(it.prompt) + vocab.answer_ids(it.sample_answer(rng), canvas) for it in items]
    return torch.tensor(rows, dtype=torch.long), len(rows[0]) - canvas


def sft_loss(model: LLaDA, x0: torch.Tensor, prompt_len: int, gen: torch.Generator, eps: float = 1e-3
             ) -> torch.Tensor:
    """LLaDA SFT loss on one batch of equal-length sequences ``x0`` [B, T]."""
    B, T = x0.shape
    t = eps + (1 - eps) * torch.rand(B, 1, generator=gen)  # [B, 1]
    answer = torch.arange(T) >= prompt_len  # [T]
    masked = (torch.rand(B, T, generator=gen) < t) & answer
    xt = torch.where(masked, model.mask_token_id, x0)
    logits = model(xt).logits  # [B, T, V]
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(B, T)
    return ((ce / t) * masked).sum() / (B * (T - prompt_len))


def task_batches(batch: int, spec: str, tasks: tuple[str, ...]) -> dict[str, int]:
    """Examples per task per step: ``batch`` for every task, except those named in ``spec``
    ("grid=96,add=32"), which lets a second phase spend its steps on the families not yet solved."""
    sizes = dict.fromkeys(tasks, batch)
    for part in filter(None, spec.split(",")):
        task, _, n = part.partition("=")
        if task not in sizes or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--task-batch: expected task=n with a task of {list(tasks)} and n >= 1, got {part!r}")
        sizes[task] = int(n)
    return sizes


def grow(model: LLaDA, saved: dict[str, torch.Tensor]) -> int:
    """Load ``saved`` (a model of the same width, possibly fewer layers) into ``model``; layers the
    saved model lacks are appended on top as identity blocks (their ``attn_out`` and ``ffn_out`` zero,
    the rest as initialised), so the grown model computes exactly what the saved one did. Returns
    the number of layers added."""
    have = len(model.layers)
    saved_layers = len({k.split(".")[1] for k in saved if k.startswith("layers.")})
    if saved_layers > have:
        raise ValueError(f"--layers: the --init model has {saved_layers} layers, cannot shrink to {have}")
    try:
        missing, unexpected = model.load_state_dict(saved, strict=False)
    except RuntimeError as e:  # a tensor of another shape (--d-model, --heads, --mlp-hidden)
        raise ValueError(f"--init: model shapes differ ({e})") from None
    if unexpected or any(not k.startswith("layers.") or int(k.split(".")[1]) < saved_layers for k in missing):
        raise ValueError(f"--init: model shapes differ (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for layer in model.layers[saved_layers:]:
            layer.attn_out.weight.zero_()
            layer.ffn_out.weight.zero_()
    return have - saved_layers


def eval_line(model: LLaDA, vocab: Vocab, per_task: int, suite: Suite = DEMO) -> dict[str, float]:
    model.eval()
    scores = {task: accuracy(evaluate(model, vocab, suite.held_out(task, per_task), steps=suite.canvas,
                                      gen_length=suite.canvas)) for task in suite.tasks}
    model.train()
    return scores


def train(args: argparse.Namespace, suite: Suite = DEMO) -> dict[str, float]:
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    vocab = suite.vocab()
    config = llada_config(vocab, args.d_model, args.layers, args.heads, args.mlp_hidden)
    model = LLaDA(config)
    init_weights(model, args.seed, args.layers)
    if args.init:  # a second phase: continue from a saved model (fresh optimiser and schedule)
        from vllm_dapd.models.loading import load_model

        grow(model, load_model(args.init).state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, args.steps - warmup)))) * 0.95 + 0.05))
    streams = {task: suite.train_stream(task, args.seed) for task in suite.tasks}
    sizes = task_batches(args.batch, args.task_batch, suite.tasks)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start, cpu_start = time.time(), time.process_time()
    bar = tqdm(range(args.steps), desc=f"train {n_params / 1e6:.2f}M params", unit="step")
    model.train()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for task in suite.tasks:
            x0, p = make_batch(vocab, [next(streams[task]) for _ in range(sizes[task])], rng, suite.canvas)
            # a task's share of the loss follows its share of the examples (1 / tasks when uniform)
            loss = sft_loss(model, x0, p, gen)
            loss = loss * sizes[task] / sum(sizes.values()) if args.task_batch else loss / len(suite.tasks)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        done = step + 1 in (args.steps, args.stop_step) or (
            args.max_minutes and time.time() - start > 60 * args.max_minutes) or (
            args.max_cpu_minutes and time.process_time() - cpu_start > 60 * args.max_cpu_minutes)
        if (step + 1) % args.eval_every == 0 or done:
            scores = eval_line(model, vocab, args.eval_items, suite)
            bar.write(f"step {step + 1} loss {total:.3f} " + " ".join(f"{k} {v:.3f}" for k, v in scores.items())
                      + f" ({time.time() - start:.0f}s, cpu {time.process_time() - cpu_start:.0f}s)")
            # saved at every eval, so an interrupted run still leaves its latest model
            save(model, vocab, args.out, with_phases(args.init, {
                "steps": step + 1, "minutes": round((time.time() - start) / 60, 1),
                "cpu_minutes": round((time.process_time() - cpu_start) / 60, 1), "params": n_params,
                "eval_accuracy": scores, "command": shlex.join(["python", *sys.argv]),
                **{k: v for k, v in vars(args).items() if k != "out"}}))
        if done:
            break
    bar.close()
    return scores


def with_phases(init: str, meta: dict) -> dict:
    """``meta`` of this phase plus ``phases``: every phase from the first (read from ``init``'s
    ``training.json``), this one last, and ``budget_minutes``: their sum, each phase counted by its
    process CPU minutes or, where a phase predates that record, its wall-clock minutes (an upper
    bound)."""
    phases: list[dict] = []
    if init and os.path.exists(os.path.join(init, "training.json")):
        with open(os.path.join(init, "training.json"), encoding="utf-8") as f:
            prior = json.load(f)
        phases = prior.get("phases") or [prior]
    phases = [*phases, {k: v for k, v in meta.items() if k not in ("phases", "budget_minutes")}]
    budget = round(sum(p.get("cpu_minutes", p["minutes"]) for p in phases), 1)
    return {**meta, "phases": phases, "budget_minutes": budget}


def save(model: LLaDA, vocab: Vocab, out: str, meta: dict) -> None:
    save_model(model, out, num_shards=2)
    write_tokenizer(out, vocab)
    eos = vocab.special("<|endoftext|>")
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": vocab.special("<|startoftext|>"), "eos_token_id": [eos, vocab.special(
            "<|eot_id|>")], "pad_token_id": eos}, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "training.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def main(argv: list[str] | None = None, suite: Suite = DEMO) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=suite.default_out)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32, help="examples per task per step")
    ap.add_argument("--task-batch", default="", help="per-task overrides of --batch, e.g. grid=96,add=32")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-hidden", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared CPU")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-items", type=int, default=64, help="test items per task in the eval line")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop early after this long (0 = never)")
    ap.add_argument("--max-cpu-minutes", type=float, default=0.0,
                    help="stop early after this much CPU time of this process (0 = never)")
    ap.add_argument("--init", default="", help="start from this saved model instead of random weights")
    ap.add_argument("--stop-step", type=int, default=0,
                    help="stop after this many steps; the schedule still spans --steps (replays a capped run)")
    args = ap.parse_args(argv)
    final = train(args, suite)
    print("final one-token-per-step accuracy: " + " ".join(f"{k} {v:.3f}" for k, v in final.items()))


if __name__ == "__main__":
    main()
