"""Record reference outputs on the tiny checkpoints into tests/fixtures/parity/ (never the code).

Run it in a scratch venv with transformers 4.57.x (the reference remote code breaks under 5.x),
pointing at your own checkout of the reference code:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 'transformers==4.57.*' \
        safetensors numpy tokenizers einops
    /tmp/refvenv/bin/python tools/make_parity_fixtures.py \
        --llada-model REF/Fast-dLLM/llada/model  # modeling_llada.py (drop its @torch.compile line)
        --dream-model REF/Fast-dLLM/dream/model  # modeling_dream.py + generation_utils.py (original loop)
        --llada-generate REF/LLaDA/generate.py   # ML-GSAI generate()

Fast-dLLM's modeling_llada.py (at commit 24cc59e) is used with its one ``@torch.compile`` line
commented out in your scratch copy (CPU, no compiler needed); DAWN's copy returns a tuple that
ML-GSAI ``generate`` cannot read. Fast-dLLM's Dream ``generation_utils.py`` keeps the original
``diffusion_generate`` branches for ``entropy`` / ``maskgit_plus``. Transformers 4.57 runs them
unpatched; Dream's ``inv_freq`` is reset to the default fp32 table (see ``fix_inv_freq``).
Every reference run is ONE prompt at a time (LLaDA's reference
ignores ``attention_mask``, so batched outputs are not per-request truths). Output: per model a
``<model>.safetensors`` (prompts, logits input ids, a column slice + log-sum-exp + argmax of every
logits row, the same for a bf16 forward, generated ids) and a shared ``manifest.json`` (seeds,
cases, weight checksums). About 45 KB in all.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vllm_dapd.models.tiny import make_tiny_dream, make_tiny_llada  # noqa: E402

OUT = os.path.join(REPO, "tests", "fixtures", "parity")
LLADA_SEED, DREAM_SEED = 0, 1
PROMPT_LENS = (7, 12)  # two prompts of different lengths -> a padded batch of 2 in the tests
LOGIT_COLS = 64  # columns [0, 64) of each logits row are kept exactly; lse/argmax cover all columns
CANVAS = 8  # masks appended to each prompt for the logits fixture
LLADA_GEN = [  # (name, gen_length, block_length, steps): low_confidence, temperature 0
    ("one_block", 16, 16, 16), ("four_blocks", 16, 4, 16), ("two_per_step", 16, 8, 8)]
DREAM_GEN = [  # (name, alg, max_new_tokens, steps), temperature 0
    ("entropy", "entropy", 16, 16), ("maskgit_plus", "maskgit_plus", 16, 16),
    ("entropy_half", "entropy", 16, 8), ("maskgit_plus_half", "maskgit_plus", 16, 8)]


def import_package(name: str, directory: str):
    """Import a reference ``model/`` folder as package ``name`` (relative imports inside work)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, "__init__.py"),
                                                  submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_file(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompts(seed: int, n_regular: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    return [torch.randint(0, n_regular, (n,), generator=gen) for n in PROMPT_LENS]


def logits_record(tensors: dict, key: str, logits: torch.Tensor) -> None:
    tensors[f"{key}.cols"] = logits[:, :LOGIT_COLS].contiguous()
    tensors[f"{key}.lse"] = torch.logsumexp(logits, -1).contiguous()
    tensors[f"{key}.argmax"] = logits.argmax(-1).contiguous()


def checksum(path: str) -> float:
    from safetensors import safe_open

    total = 0.0
    for f in sorted(x for x in os.listdir(path) if x.endswith(".safetensors")):
        with safe_open(os.path.join(path, f), "pt") as st:
            total += sum(float(st.get_tensor(k).double().sum()) for k in st.keys())
    return total


def run_llada(args, workdir: str, manifest: dict) -> dict:
    ref = import_package("ref_llada", args.llada_model)
    gen_mod = import_file("ref_llada_generate", args.llada_generate)
    path = make_tiny_llada(os.path.join(workdir, "llada"), seed=LLADA_SEED)
    model = ref.LLaDAModelLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    cfg = model.config
    n_regular = cfg.mask_token_id - 2  # specials follow the regular vocab; mask is the 3rd special
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(prompts(LLADA_SEED, n_regular)):
        ids = torch.cat([p, torch.full((CANVAS,), cfg.mask_token_id)])[None]
        tensors[f"logits.{i}.input_ids"] = ids[0].contiguous()
        tensors[f"prompt.{i}"] = p.clone()
        with torch.no_grad():
            logits_record(tensors, f"logits.{i}", model(ids).logits[0].float())
            logits_record(tensors, f"bf16.{i}", copy.deepcopy(model).to(torch.bfloat16)(ids).logits[0].float())
        for name, gen_length, block_length, steps in LLADA_GEN:
            out = gen_mod.generate(model, p[None], steps=steps, gen_length=gen_length, block_length=block_length,
                                   temperature=0.0, remasking="low_confidence", mask_id=cfg.mask_token_id)
            tensors[f"gen.{name}.{i}.output"] = out[0, p.numel():].contiguous()
    manifest["llada"] = {"seed": LLADA_SEED, "checksum": checksum(path), "mask_token_id": cfg.mask_token_id,
                         "cases": [dict(zip(("name", "gen_length", "block_length", "steps"), c)) for c in LLADA_GEN]}
    return tensors


def fix_inv_freq(model):
    """Dream's inv_freq is a non-persistent buffer: make it hold the default fp32 RoPE table, not
    what the meta-device init left (silently wrong logits) nor a bf16-rounded copy after ``.to``
    (a real bf16 load keeps it fp32)."""
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    for m in model.modules():
        if hasattr(m, "inv_freq"):
            m.inv_freq = inv.clone()
            m.original_inv_freq = m.inv_freq
    return model


def run_dream(args, workdir: str, manifest: dict) -> dict:
    ref = import_package("ref_dream", args.dream_model)
    path = make_tiny_dream(os.path.join(workdir, "dream"), seed=DREAM_SEED)
    model = ref.DreamModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    cfg = model.config
    fix_inv_freq(model)
    n_regular = cfg.mask_token_id - 4  # mask is the 5th special after the regular vocab
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(prompts(DREAM_SEED, n_regular)):
        ids = torch.cat([p, torch.full((CANVAS,), cfg.mask_token_id)])[None]
        tensors[f"logits.{i}.input_ids"] = ids[0].contiguous()
        tensors[f"prompt.{i}"] = p.clone()
        with torch.no_grad():
            logits_record(tensors, f"logits.{i}", model(ids).logits[0].float())
            bf16 = fix_inv_freq(copy.deepcopy(model).to(torch.bfloat16))  # a copy: keep fp32 weights exact
            logits_record(tensors, f"bf16.{i}", bf16(ids).logits[0].float())
        for name, alg, max_new, steps in DREAM_GEN:
            # top_k/top_p explicit: left unset, transformers <= 4.57 leaks PretrainedConfig's generation
            # defaults (top_k=50, top_p=1.0) through from_model_config, and the confidences would be
            # measured on a top-50 renormalised distribution (argmax unchanged, ranking not).
            out = model.diffusion_generate(p[None], max_new_tokens=max_new, steps=steps, temperature=0.0,
                                           top_k=None, top_p=None,
                                           alg=alg, alg_temp=0.0, mask_token_id=cfg.mask_token_id,
                                           return_dict_in_generate=True, output_history=False)
            tensors[f"gen.{name}.{i}.output"] = out.sequences[0, p.numel():].contiguous()
    manifest["dream"] = {"seed": DREAM_SEED, "checksum": checksum(path), "mask_token_id": cfg.mask_token_id,
                         "cases": [dict(zip(("name", "alg", "max_new_tokens", "steps"), c)) for c in DREAM_GEN]}
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llada-model", required=True)
    ap.add_argument("--dream-model", required=True)
    ap.add_argument("--llada-generate", required=True)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    manifest = {"prompt_lens": list(PROMPT_LENS), "canvas": CANVAS, "logit_cols": LOGIT_COLS,
                # fp32 logits are bit-identical only under the same ATen CPU kernels
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    with tempfile.TemporaryDirectory() as workdir:
        save_file(run_llada(args, workdir, manifest), os.path.join(args.out, "llada.safetensors"))
        save_file(run_dream(args, workdir, manifest), os.path.join(args.out, "dream.safetensors"))
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
