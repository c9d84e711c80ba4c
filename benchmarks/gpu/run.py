"""CUDA correctness and scale benchmark of the model + stepper, with no vLLM (one script, <= 8 minutes).

Why without vLLM: the device machines this project may borrow have PyTorch + CUDA but no vLLM and no
package registry. The runner's batched step (``vllm_dapd/engine/core/stepper.py``), its paged KV
(``engine/core/kv.py``), the models (``vllm_dapd/models``) and the reference loop
(``vllm_dapd/decoding/generate.py``) are plain PyTorch, so everything the vLLM runner computes per
engine step is measured here; vLLM's scheduling around it is not. No transformers either (the
model configs are built from their ``config.json`` fields); ``tiny.py`` checkpoints are used for the
correctness section when transformers, tokenizers and safetensors import, else the same shapes
are built in memory.

Sections (each checks the clock and records ``"skipped: time"`` for what would overrun ``--budget``;
the JSON is rewritten after every measurement, so a killed run still leaves results):

1. ``correctness``: tiny LLaDA and Dream (``vllm_dapd/models/tiny.py`` shapes), fp32, device vs CPU:
   logits and attention-hook max abs diff; the reference loop (every registered policy) and the
   stepper (every policy, and the DAPD variants of ``VARIANTS``, x cache mode ``none``/``prefix``/``dual``
   on the portable paged KV that CUDA runs today (no vLLM kernel), a padded batch of mixed prompt
   lengths, one row sampled at temperature 0.7) token for token; tiny LLaDA2 (MoE, block-causal):
   logits and LLaDA2's block-diffusion loop, with and without block KV reuse (needs transformers).
   ``--cpu``: CPU vs CPU (plumbing).
2. ``scale``: random-weight bf16 models of LLaDA-8B-Instruct's and Dream-v0-Instruct-7B's shapes,
   initialised on the device; prompts of ~500 tokens, a canvas of 256: forward time; the plain
   batch-1 loop of ``generate.py`` (full recompute, one token per step) as the yardstick; the stepper
   at batch 1/8/32/64 for ``low_confidence``, ``threshold``, ``dapd`` (its default, variant ``tuned``),
   ``dapd_staged`` / ``dapd_direct`` (DAPD as its authors wrote it) and ``dawn`` (``RUNS``; blocks of 32 with
   the dual cache, one block of 256 with the prefix cache): tokens/s, NFE, step time, the share of a
   step spent in the policy, in the forward and elsewhere, and the peak memory a step allocates
   beyond weights and KV pages.

    PYTHONUNBUFFERED=1 python benchmarks/gpu/run.py --out DIR          # CUDA, full shapes
    python benchmarks/gpu/run.py --cpu --tiny --out DIR                  # CPU dry run (< 1 minute)

Writes ``DIR/<device>.json`` (``nvidia-h200.json``, ``cpu.json``) and ``DIR/<device>.png``.
See ``benchmarks/gpu/README.md`` for the device call and the published figures to compare with.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a plain checkout (the device machine has no install)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vllm_dapd.decoding import available_policies, denoise, get_policy  # noqa: E402
from vllm_dapd.engine.core.kv import PagedKV  # noqa: E402
from vllm_dapd.engine.core.sequence import Sequence  # noqa: E402
from vllm_dapd.engine.core import offline  # noqa: E402
from vllm_dapd.engine.core.stepper import denoise_step  # noqa: E402
from vllm_dapd.models.dream import Dream  # noqa: E402
from vllm_dapd.models.llada import LLaDA  # noqa: E402

# config.json of GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B (shape fields).
SHAPES = {
    "full": {
        "llada": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                      embedding_size=126464, vocab_size=126464, mask_token_id=126336, rope_theta=500000.0,
                      rms_norm_eps=1e-5),
        "dream": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      intermediate_size=18944, vocab_size=152064, mask_token_id=151666, rope_theta=1000000.0,
                      rms_norm_eps=1e-6),
    },
    "medium": {
        "llada": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, embedding_size=4096,
                      vocab_size=4096, mask_token_id=4000, rope_theta=500000.0, rms_norm_eps=1e-5),
        "dream": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=768, vocab_size=4096, mask_token_id=4000, rope_theta=1000000.0,
                      rms_norm_eps=1e-6),
    },
    "tiny": {  # the defaults of vllm_dapd/models/tiny.py (vocabulary 310 padded to 320 rows)
        "llada": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, embedding_size=320,
                      vocab_size=320, mask_token_id=306, rope_theta=500000.0, rms_norm_eps=1e-5),
        "dream": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=320, mask_token_id=309, rope_theta=1000000.0,
                      rms_norm_eps=1e-6),
    },
}
SCALE_NAMES = {"llada": "llada_8b", "dream": "dream_7b"}
# Named policy settings (label -> policy name, parameters): the scale runs time these; the correctness
# section checks every registered policy at its defaults plus the labelled variants below.
RUNS = {
    "low_confidence": ("low_confidence", {}),
    "threshold": ("threshold", {}),
    "dapd": ("dapd", {}),  # the default (variant tuned)
    "dapd_staged": ("dapd", {"variant": "staged"}),  # DAPD as its authors wrote it (their default)
    "dapd_direct": ("dapd", {"variant": "direct"}),
    "dawn": ("dawn", {}),
}
POLICIES = tuple(RUNS)
VARIANTS = {label: v for label, v in RUNS.items() if v[1]}  # beyond each policy's defaults
VARIANTS["dapd_staged_tau005"] = ("dapd", {"variant": "staged", "tau_max": 0.05})
PAGE = 16  # KV page size in positions (vLLM's default block size)

PUBLISHED = [  # batch 1, LLaDA-8B-Instruct GSM8K, gen length 256 (the papers' own tables)
    {"source": "Fast-dLLM, arXiv 2505.22618", "gpu": "A100", "block_length": 32,
     "baseline_tok_s": 6.7, "tok_s": 54.4, "how": "dual cache + threshold 0.9"},
    {"source": "DAWN, arXiv 2602.06953", "gpu": "H100", "baseline_tok_s": 10.32, "tok_s": 44.72,
     "how": "DAWN, one block over the answer"},
]
NOTES = [
    "Random weights: no confidence reaches a threshold (0.9), so threshold/dapd/dawn commit the per-step "
    "minimum and take their whole step budget; their NFE here says nothing about real checkpoints. Compare "
    "per-step cost and the fixed-steps tokens/s (every policy at the same NFE).",
    "tokens/s = batch x canvas / wall time of the whole generation (prefill step included).",
    "yardstick = vllm_dapd.decoding.denoise at batch 1: full recompute of prompt + canvas every step, "
    "low_confidence, one token per step (ML-GSAI/LLaDA generate.py semantics), what the papers' baselines run.",
    "step shares: forward = model call, policy = policy.step, other = the stepper's gathers, KV paging, Python; "
    "each timed with a device sync around it.",
    "peak_extra_gib = torch.cuda.max_memory_allocated during a step minus what was allocated before it "
    "(weights, KV pages and caches excluded).",
]


@dataclass(frozen=True)
class Plan:
    shape: str
    prompt_len: int
    gen: int
    small_block: int
    fixed_steps: int  # total steps of the fixed-steps runs (gen / fixed_steps tokens per step)
    batches: tuple[int, ...]
    repeats: int  # timed forwards


PLANS = {
    "full": Plan("full", 500, 256, 32, 32, (1, 8, 32, 64), 3),
    "medium": Plan("medium", 64, 64, 16, 16, (1, 4), 2),
    "tiny": Plan("tiny", 12, 16, 8, 4, (1, 2), 2),
}


# ---------------------------------------------------------------- plumbing


class Clock:
    """Elapsed time against the budget; sections end at a fraction of it."""

    def __init__(self, budget: float):
        self.t0, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, seconds: float, until: float) -> bool:
        return self.elapsed() + seconds <= until * self.budget


def log(msg: str) -> None:
    print(f"[gpu-bench] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def llada_config(shape: dict) -> SimpleNamespace:
    """The fields ``llada_spec`` reads, as LLaDA-8B-Instruct's config.json has them (llama block)."""
    return SimpleNamespace(
        block_type="llama", activation_type="silu", layer_norm_type="rms", rope=True, alibi=False,
        attention_layer_norm=False, block_group_size=1, include_bias=False, include_qkv_bias=False,
        layer_norm_with_affine=True, rope_full_precision=True, input_emb_norm=False, scale_logits=False,
        weight_tying=False, num_key_value_heads=shape["n_kv_heads"], intermediate_size=shape["mlp_hidden_size"],
        **shape)


def dream_config(shape: dict) -> SimpleNamespace:
    return SimpleNamespace(hidden_act="silu", rope_scaling=None, use_sliding_window=False,
                           tie_word_embeddings=False, **shape)


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    """In place, on the parameters' device (no CPU copy of an 8B model); scaled like ``tiny.py``
    so activations stay O(1): norms ~1, biases small, matrices N(0, 1/fan_in)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.normal_(1.0, 0.1, generator=gen)
        elif p.dim() == 1:
            p.normal_(0.0, 0.1, generator=gen)
        elif name.startswith("embed"):
            p.normal_(0.0, 1.0, generator=gen)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)


def build(arch: str, shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    cls, cfg = (LLaDA, llada_config(shape)) if arch == "llada" else (Dream, dream_config(shape))
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype).to_empty(device=device)
    init_random_(model, seed, device)
    return model.eval()


def tiny_models(tmp: str) -> tuple[dict[str, torch.nn.Module], str]:
    """fp32 tiny LLaDA and Dream on CPU: ``tiny.py`` checkpoints if its dependencies import, else in memory."""
    try:
        from vllm_dapd.models.loading import load_model
        from vllm_dapd.models.tiny import make_tiny_dream, make_tiny_llada

        return ({"llada": load_model(make_tiny_llada(os.path.join(tmp, "llada"))),
                 "dream": load_model(make_tiny_dream(os.path.join(tmp, "dream")))}, "vllm_dapd/models/tiny.py checkpoints")
    except Exception as exc:  # noqa: BLE001 - transformers/tokenizers/safetensors missing or incompatible
        reason = f"{type(exc).__name__}: {exc}"
    cpu = torch.device("cpu")
    return ({a: build(a, SHAPES["tiny"][a], torch.float32, cpu, seed=i) for i, a in enumerate(("llada", "dream"))},
            f"in memory, tiny.py shapes ({reason[:200]})")


def named(label: str) -> tuple[str, dict]:
    """(policy name, parameters) of a label: a registered policy's name, or one of ``RUNS`` / ``VARIANTS``."""
    return RUNS.get(label) or VARIANTS.get(label) or (label, {})


def sequences(model: Any, prompts: list[list[int]], gen: int, policy: str, block: int, steps: int, cache: str,
              temperatures: list[float]) -> list[Sequence]:
    name, extra = named(policy)
    settings = {"policy": name, "block_length": block, "steps": steps, "cache_mode": cache, **extra}
    seqs, _ = offline.sequences(model, [offline.Request(list(p), settings, gen, t, b)
                                        for b, (p, t) in enumerate(zip(prompts, temperatures))], kv=None)
    page = 0
    for s in seqs:  # contiguous pages, one pool for the batch (``paged_kv``)
        n = -(-s.end // PAGE)
        s.block_ids, page = list(range(page, page + n)), page + n
    return seqs


def paged_kv(model: Any, seqs: list[Sequence], device: torch.device) -> PagedKV | None:
    if seqs[0].settings.cache_mode == "none":
        return None
    spec, pages = model.spec, sum(len(s.block_ids) for s in seqs)
    dtype = next(model.parameters()).dtype
    return PagedKV(spec.n_layers, pages, PAGE, spec.n_kv_heads, spec.head_dim, dtype, device)


def random_prompts(n: int, lengths: list[int], high: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


# ---------------------------------------------------------------- 1. correctness


def compare(a: list[list[int]], b: list[list[int]], nfe_a: list[int], nfe_b: list[int]) -> dict:
    bad = sum(int(x != y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) + sum(abs(len(ra) - len(rb))
                                                                              for ra, rb in zip(a, b))
    return {"identical": bad == 0 and nfe_a == nfe_b, "mismatched_tokens": bad, "nfe_equal": nfe_a == nfe_b}


def run_stepper(model: Any, seqs: list[Sequence], device: torch.device) -> tuple[list[list[int]], list[int]]:
    kv, out, live = paged_kv(model, seqs, device), {s.req_id: [] for s in seqs}, list(seqs)
    while live:
        for s, block in zip(live, denoise_step(model, live, device, kv)):
            out[s.req_id] += block
        live = [s for s in live if not s.finished]
    return [out[s.req_id] for s in seqs], [s.nfe for s in seqs]


def guarded(fn: Callable[[], dict]) -> dict:
    """One comparison; an exception is recorded (the other comparisons still run)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return {"identical": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-1500:]}


def loop_pair(ref: Any, dev: Any, prompt: torch.Tensor, device: torch.device, policy: str, gen: int, block: int,
              steps: int) -> dict:
    name, params = named(policy)
    r = [denoise(m, p, gen_length=gen, block_length=block, steps=steps * gen // block, policy=name, params=params)
         for m, p in ((ref, prompt), (dev, prompt.to(device)))]
    return compare([r[0].tokens[0].tolist()], [r[1].tokens[0].cpu().tolist()], r[0].nfe.tolist(), r[1].nfe.cpu().tolist())


def stepper_pair(ref: Any, dev: Any, prompts: list[list[int]], device: torch.device, policy: str, cache: str,
                 gen: int, block: int, steps: int) -> dict:
    """A padded batch of three prompt lengths; the last row samples at temperature 0.7 (hash noise)."""
    temps = [0.0, 0.0, 0.7]
    a_tok, a_nfe = run_stepper(ref, sequences(ref, prompts, gen, policy, block, steps, cache, temps), torch.device("cpu"))
    b_tok, b_nfe = run_stepper(dev, sequences(dev, prompts, gen, policy, block, steps, cache, temps), device)
    return compare(a_tok, b_tok, a_nfe, b_nfe)


def correctness(device: torch.device, clock: Clock, until: float, res: dict, save: Callable[[], None]) -> None:
    if device.type == "cuda":  # fp32 parity: no TF32 anywhere
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        cpu_models, source = tiny_models(tmp)
    res["source"] = source
    res["compared"] = f"{device.type} vs cpu" if device.type != "cpu" else "cpu vs cpu (plumbing only)"
    policies = available_policies() + sorted(VARIANTS)
    gen, block, steps = 16, 8, 4
    for arch, ref in cpu_models.items():
        dev = copy.deepcopy(ref).to(device)
        out: dict[str, Any] = res.setdefault(arch, {})
        ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            a = ref(ids, attention_span=(24, 40), attention_layers=(-1,))
            b = dev(ids.to(device), attention_span=(24, 40), attention_layers=(-1,))
        out["logits_max_abs_diff"] = float((a.logits - b.logits.cpu()).abs().max())
        out["attention_max_abs_diff"] = float((a.attention - b.attention.cpu()).abs().max())
        prompt = torch.tensor(random_prompts(1, [12], 300, seed=2))
        loop, step = out.setdefault("reference_loop", {}), out.setdefault("stepper", {})
        for policy in policies:
            if not clock.fits(2.0, until):
                loop[policy] = "skipped: time"
                continue
            loop[policy] = guarded(lambda: loop_pair(ref, dev, prompt, device, policy, gen, block, steps))
        prompts = random_prompts(3, [5, 9, 12], 300, seed=3)
        for policy in policies:
            for cache in ("none", "prefix", "dual"):
                if not clock.fits(2.0, until):
                    step.setdefault(policy, {})[cache] = "skipped: time"
                    continue
                step.setdefault(policy, {})[cache] = guarded(
                    lambda: stepper_pair(ref, dev, prompts, device, policy, cache, gen, block, steps))
        done = [v for d in (loop, *step.values()) for v in d.values() if isinstance(v, dict)]
        out["identical"] = f"{sum(v['identical'] for v in done)}/{len(done)}"
        log(f"correctness {arch}: logits diff {out['logits_max_abs_diff']:.3g}, identical {out['identical']}")
        save()
    res["llada2"] = guarded(lambda: block_diffusion_pair(device, clock, until)) if clock.fits(5.0, until) \
        else "skipped: time"
    save()


def block_diffusion_pair(device: torch.device, clock: Clock, until: float) -> dict:
    """Tiny LLaDA2 (MoE, block-causal): device vs CPU logits with the block-causal mask, and LLaDA2's
    block-diffusion loop (``vllm_dapd.decoding.block_diffusion``, full recompute and exact block KV
    reuse) token for token. Needs transformers (its config class); recorded as skipped without it."""
    try:
        from vllm_dapd.models.loading import load_model
        from vllm_dapd.models.tiny import make_tiny_llada2
    except Exception as exc:  # noqa: BLE001 - transformers missing on the device machine
        return {"identical": None, "skipped": f"needs transformers: {type(exc).__name__}: {exc}"[:300]}
    from vllm_dapd.decoding.block_diffusion import block_diffusion_generate

    with tempfile.TemporaryDirectory() as tmp:
        ref = load_model(make_tiny_llada2(os.path.join(tmp, "llada2")))
    dev = copy.deepcopy(ref).to(device)
    ids = torch.randint(0, 280, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        a, b = ref(ids, block_size=8), dev(ids.to(device), block_size=8)
    out: dict[str, Any] = {"logits_max_abs_diff": float((a.logits - b.logits.cpu()).abs().max())}
    prompt = torch.tensor(random_prompts(2, [11], 280, seed=5))
    for kv_cache in (False, True):
        if not clock.fits(2.0, until):
            out[f"kv_cache_{kv_cache}"] = "skipped: time"
            continue
        r = [block_diffusion_generate(m, p, gen_length=16, block_length=8, steps=4, threshold=0.5,
                                      kv_cache=kv_cache) for m, p in ((ref, prompt), (dev, prompt.to(device)))]
        out[f"kv_cache_{kv_cache}"] = compare(r[0].sequences.tolist(), r[1].sequences.cpu().tolist(),
                                              r[0].nfe.tolist(), r[1].nfe.cpu().tolist())
    done = [v for v in out.values() if isinstance(v, dict)]
    out["identical"] = bool(done) and all(v["identical"] for v in done)
    log(f"correctness llada2: logits diff {out['logits_max_abs_diff']:.3g}, identical {out['identical']}")
    return out


# ---------------------------------------------------------------- 2. scale


class StepTimers:
    """Wraps ``model.forward`` and ``policy.step`` (instance attributes, removed on exit) with synced timers."""

    def __init__(self, model: Any, policy: str, device: torch.device):
        self.model, self.policy, self.device = model, get_policy(named(policy)[0]), device
        self.forward = self.policy_s = 0.0

    def _wrap(self, fn: Callable, attr: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - t)
            return out
        return timed

    def __enter__(self) -> "StepTimers":
        self.model.forward = self._wrap(self.model.forward, "forward")
        self.policy.step = self._wrap(self.policy.step, "policy_s")
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.forward
        del self.policy.step


def stepper_run(model: Any, device: torch.device, plan: Plan, policy: str, batch: int, block: int,
                steps_per_block: int, cache: str) -> dict:
    """One whole generation of ``batch`` sequences through ``denoise_step``, every step timed."""
    lengths = [plan.prompt_len - 8 * i for i in range(4)]  # ~500 tokens, mixed (padding costs included)
    prompts = random_prompts(batch, lengths, model.mask_token_id - 10, seed=batch)
    seqs = sequences(model, prompts, plan.gen, policy, block, steps_per_block, cache, [0.0] * batch)
    kv = paged_kv(model, seqs, device)
    kv_bytes = sum(t.numel() * t.element_size() for t in kv.layers) if kv else 0
    steps, peaks, fwd, pol = [], [], [], []
    live = list(seqs)
    t_start = time.perf_counter()
    with StepTimers(model, policy, device) as tm:
        while live:
            sync(device)
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t, f0, p0 = time.perf_counter(), tm.forward, tm.policy_s
            denoise_step(model, live, device, kv)
            sync(device)
            steps.append(time.perf_counter() - t)
            fwd.append(tm.forward - f0)
            pol.append(tm.policy_s - p0)
            if device.type == "cuda":
                peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**30)
            live = [s for s in live if not s.finished]
    wall = time.perf_counter() - t_start
    total = sum(steps)
    del kv
    return {
        "policy": policy, "batch": batch, "block_length": block, "steps_per_block": steps_per_block,
        "cache_mode": cache, "nfe_budget": steps_per_block * (plan.gen // block),
        "nfe_mean": statistics.mean(s.nfe for s in seqs), "wall_s": wall,
        "tok_s": batch * plan.gen / wall, "tok_s_per_sequence": plan.gen / wall,
        "first_step_ms": steps[0] * 1e3, "step_ms_median": statistics.median(steps) * 1e3,
        "step_ms_mean": total / len(steps) * 1e3,
        "share": {"forward": sum(fwd) / total, "policy": sum(pol) / total,
                  "other": max(0.0, 1 - (sum(fwd) + sum(pol)) / total)},
        "policy_ms_mean": sum(pol) / len(pol) * 1e3,
        "peak_extra_gib_max": max(peaks) if peaks else None, "kv_pages_gib": kv_bytes / 2**30,
    }


def timed_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


class Estimator:
    """Predicted seconds of a run from the step times measured so far (for the time guard): the same
    configuration at the largest batch measured so far (scaled linearly), else twice any configuration
    at this batch, else the batch-1 forward times the batch."""

    def __init__(self, forward_s: float):
        self.forward_s = forward_s
        self.step: dict[tuple[str, int], float] = {}

    def add(self, run: dict) -> None:
        key = (run["config"], run["batch"])
        self.step[key] = max(self.step.get(key, 0.0), run["wall_s"] / max(1, run["nfe_mean"]))

    def run_s(self, config: str, batch: int, nfe: int) -> float:
        same = [b for c, b in self.step if c == config and b <= batch]
        if same:
            per = self.step[(config, max(same))] * batch / max(same)
        else:
            other = [t for (c, b), t in self.step.items() if b == batch]
            per = 2 * max(other) if other else self.forward_s * batch
        return per * nfe * 1.15 + 1.0


def scale(arch: str, plan: Plan, dtype: torch.dtype, device: torch.device, clock: Clock, until: float,
          res: dict, save: Callable[[], None]) -> None:
    shape = SHAPES[plan.shape][arch]
    res["shape"] = shape
    if not clock.fits(20.0, until):
        res["skipped"] = "skipped: time"
        return
    t = time.perf_counter()
    model = build(arch, shape, dtype, device)
    sync(device)
    res["init_s"] = time.perf_counter() - t
    res["params"] = sum(p.numel() for p in model.parameters())
    res["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    P, G = plan.prompt_len, plan.gen
    x = torch.cat((torch.randint(0, model.mask_token_id - 10, (1, P)), torch.full((1, G), model.mask_token_id)), 1)
    x = x.to(device)
    with torch.inference_mode():
        plain = timed_ms(lambda: model(x), device, plan.repeats)
        hook = timed_ms(lambda: model(x, attention_span=(P, P + G), attention_layers=(-1,)), device, plan.repeats)
    res["forward"] = {"batch": 1, "tokens": P + G, "ms": plain, "with_attention_hook_ms": hook}
    log(f"{arch}: {res['params'] / 1e9:.2f}B params, init {res['init_s']:.1f} s, forward {plain:.1f} ms")
    save()
    est = Estimator(plain / 1e3)

    if clock.fits(G * plain / 1e3 * 1.15 + 1, until):
        t = time.perf_counter()
        r = denoise(model, x[:, :P], gen_length=G, block_length=plan.small_block, steps=G, policy="low_confidence")
        sync(device)
        wall = time.perf_counter() - t
        res["yardstick"] = {"batch": 1, "block_length": plan.small_block, "steps": G, "nfe": int(r.nfe[0]),
                            "wall_s": wall, "tok_s": G / wall, "ms_per_forward": wall / int(r.nfe[0]) * 1e3}
        log(f"{arch}: yardstick (reference loop, batch 1) {G / wall:.2f} tok/s")
    else:
        res["yardstick"] = "skipped: time"
    save()

    S, B0 = plan.fixed_steps, plan.small_block
    # (label, block, steps per block, cache, batches): fixed-steps runs first, then batch-1 runs with
    # one token per step (the NFE each policy took), then one block over the whole canvas.
    configs = [(f"blocks{B0}_dual_fixed{S}", B0, S * B0 // G, "dual", plan.batches),
               (f"blocks{B0}_dual_steps{G}_batch1", B0, B0, "dual", (1,)),
               (f"block{G}_prefix_fixed{S}", G, S, "prefix", plan.batches)]
    runs = res.setdefault("runs", [])
    for label, block, spb, cache, batches in configs:
        for batch in batches:
            for policy in POLICIES:
                nfe = spb * (G // block)
                if not clock.fits(est.run_s(label, batch, nfe), until):
                    runs.append({"config": label, "policy": policy, "batch": batch, "result": "skipped: time"})
                    continue
                try:
                    run = {"config": label, **stepper_run(model, device, plan, policy, batch, block, spb, cache)}
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: record, free, go on
                    runs.append({"config": label, "policy": policy, "batch": batch,
                                 "result": f"error: {type(exc).__name__}: {exc}"[:2000]})
                    log(f"{arch} {label} B={batch} {policy}: {type(exc).__name__}: {str(exc)[:200]}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                est.add(run)
                runs.append(run)
                log(f"{arch} {label} B={batch} {policy}: {run['tok_s']:.1f} tok/s, step {run['step_ms_median']:.1f} "
                    f"ms, policy {100 * run['share']['policy']:.1f}%, nfe {run['nfe_mean']:.0f}")
                save()
    res["summary"] = summarise(runs, res.get("yardstick"), plan.shape == "full" and device.type == "cuda")
    save()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summarise(runs: list[dict], yardstick: Any, target_applies: bool) -> dict:
    """The 3% DAPD target is judged only at full shapes on a GPU: a tiny model's step is all overhead."""
    done = [r for r in runs if "tok_s" in r]
    dapd = [r["share"]["policy"] for r in done if named(r["policy"])[0] == "dapd"]  # every DAPD variant
    out: dict[str, Any] = {"dapd_policy_share_max": max(dapd) if dapd else None,
                           "dapd_policy_share_target": 0.03,
                           "dapd_policy_share_met": (max(dapd) <= 0.03) if dapd and target_applies else None,
                           "target_applies": target_applies,
                           "skipped_runs": len(runs) - len(done)}
    if isinstance(yardstick, dict):
        b1 = [r for r in done if r["batch"] == 1 and r["nfe_budget"] == yardstick["nfe"]]
        out["batch1_same_nfe_speedup_over_yardstick"] = {f"{r['config']}:{r['policy']}": r["tok_s"] / yardstick["tok_s"]
                                                         for r in b1}
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    archs = [a for a in SCALE_NAMES.values() if results["scale"].get(a, {}).get("runs")]
    if not archs:
        return
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        res = results["scale"][arch]
        for label in sorted({r["config"] for r in res["runs"] if "tok_s" in r}):
            for policy in POLICIES:
                pts = sorted((r["batch"], r["tok_s"]) for r in res["runs"]
                             if r["config"] == label and r["policy"] == policy and "tok_s" in r)
                if len(pts) > 1:
                    ax.plot(*zip(*pts), marker="o", label=f"{policy} {label}", color=f"C{POLICIES.index(policy)}",
                            linestyle="-" if "dual" in label else "--")
        if isinstance(res.get("yardstick"), dict):
            ax.axhline(res["yardstick"]["tok_s"], color="k", linestyle=":", label="reference loop, batch 1")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s",
               title=f"{arch} ({results['meta']['plan']['shape']} shape)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"vllm-dapd stepper, random weights, {results['meta']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def meta(args: argparse.Namespace, device: torch.device, plan: Plan) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    mods = {}
    for mod in ("vllm", "transformers"):
        try:
            __import__(mod)
            mods[mod] = True
        except Exception:  # noqa: BLE001 - absent, or broken on this machine
            mods[mod] = False
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "commit": commit, "importable": mods, "budget_s": args.budget,
            "plan": asdict(plan), "dtype": args.dtype, "policies": {k: list(v) for k, v in RUNS.items()},
            "correctness_variants": {k: list(v) for k, v in VARIANTS.items()}, "published": PUBLISHED,
            "notes": NOTES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for <device>.json and .png")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (correctness then compares CPU with CPU)")
    ap.add_argument("--tiny", action="store_true", help="scale section with tiny shapes (CI dry run)")
    ap.add_argument("--shape", choices=sorted(PLANS), default=None, help="scale shapes (default full; --tiny = tiny)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--skip", nargs="*", default=(), choices=("correctness", "llada", "dream"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = PLANS[args.shape or ("tiny" if args.tiny else "full")]
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device visible: pass --cpu for a dry run")
    device = torch.device("cpu" if args.cpu else "cuda")
    clock = Clock(args.budget)
    results = {"meta": meta(args, device, plan), "correctness": {}, "scale": {}, "errors": []}
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", results["meta"]["device_name"].lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{slug}.json"

    def save() -> None:
        results["elapsed_s"] = clock.elapsed()
        write_json(path, results)

    sections: list[tuple[str, float, Callable[[float], None]]] = [
        ("correctness", 0.15, lambda until: correctness(device, clock, until, results["correctness"], save))]
    dtype = getattr(torch, args.dtype)
    for arch, until in (("llada", 0.58), ("dream", 0.97)):
        res = results["scale"].setdefault(SCALE_NAMES[arch], {})
        sections.append((arch, until, lambda u, a=arch, r=res: scale(a, plan, dtype, device, clock, u, r, save)))
    for name, until, fn in sections:
        if name in args.skip:
            continue
        log(f"section {name} (elapsed {clock.elapsed():.0f} s of {args.budget:.0f})")
        try:
            fn(until)
        except Exception as exc:  # noqa: BLE001 - record and go on: later sections still run
            results["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-3000:]})
            log(f"section {name} failed: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
        plot(results, path.with_suffix(".png"))
    log(f"done in {clock.elapsed():.0f} s: {path}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
