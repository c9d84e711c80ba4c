"""Record LLaDA2 reference outputs on the tiny LLaDA2 checkpoint into tests/fixtures/parity/ (never the code).

The sibling of ``make_parity_fixtures.py`` (LLaDA, Dream), run the same way: a scratch venv with
transformers 4.57.x and a scratch copy of the reference model files, e.g. from
yks23/Information-Gain-Sampler at commit f1cb636 (the files were removed from that repository's
later history):

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 'transformers==4.57.*' \
        safetensors numpy tokenizers
    mkdir REF && cp .../dllm/dllm/pipelines/llada2/models/{modeling,configuration}_llada2_moe.py REF/
    /tmp/refvenv/bin/python tools/make_llada2_parity_fixtures.py --llada2-model REF

The reference runs unmodified but for two substitutions, made on the loaded model object:

* at temperature 0 that copy of ``_sample_with_temperature_topk_topp`` still draws with
  ``torch.multinomial`` (it only skips the division by the temperature), so ``generate`` is not
  deterministic; the tool gives it the greedy rule later upstream copies use (argmax token, its
  softmax probability as the confidence);
* ``generate`` builds its block-causal mask in bf16, which fp32 SDPA rejects (the mask dtype must
  match the query's); the model's ``forward`` gets the same mask cast to fp32 (its values, 0 and
  -inf, are exact in both dtypes).

Every run is one prompt at a time, as ``generate`` takes.

Output: ``llada2.safetensors`` (prompts; for each, the logits of prompt + masks with no attention
mask (bidirectional, the reference forward's default), with the block-causal mask ``generate``
builds, and from a bf16 load (column slice + log-sum-exp + argmax per row); generated ids per case) and a
``llada2`` entry in ``manifest.json`` (seed, cases, weight checksum). About 30 KB.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import types

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vllm_dapd.models.tiny import make_tiny_llada2  # noqa: E402

OUT = os.path.join(REPO, "tests", "fixtures", "parity")
SEED = 2
PROMPT_LENS = (7, 12)
LOGIT_COLS = 64
CANVAS = 9  # masks after each prompt in the logits fixture (prompt + canvas spans 4-position blocks)
MASK_BLOCK = 4  # block size of the block-causal logits fixture
GEN = [  # (name, gen_length, block_length, steps, threshold, eos_id or None for the config's, minimal_topk)
    ("b4", 16, 4, 4, 0.95, None, 1), ("b8_two_per_step", 16, 8, 4, 0.95, None, 1),
    ("b8_threshold", 16, 8, 8, 0.05, None, 1), ("b32_one_block", 20, 32, 32, 0.95, None, 1),
    # an eos id the tiny model does produce (171, 43: frequent in the cases above): the early stop and the cut
    ("b4_eos", 16, 4, 4, 0.95, 171, 1), ("b8_eos", 16, 8, 4, 0.95, 43, 1),
    # more steps than block positions (empty transfer steps), and steps capped by gen_length // minimal_topk
    ("b4_eight_steps", 8, 4, 8, 0.95, None, 1), ("b8_capped_steps", 8, 8, 8, 0.95, None, 4)]


def import_reference(directory: str):
    """Import ``modeling_llada2_moe.py`` (and its relative config import) from a plain folder."""
    pkg = types.ModuleType("ref_llada2")
    pkg.__path__ = [directory]
    sys.modules["ref_llada2"] = pkg
    return importlib.import_module("ref_llada2.modeling_llada2_moe")


def greedy_sample(logits, temperature=0.0, top_k=None, top_p=None):
    """Temperature-0 rule: argmax token and its softmax probability (shapes as the reference's)."""
    probs = F.softmax(logits.float(), dim=-1)
    token = probs.argmax(-1)
    return token, probs.gather(-1, token[..., None])[..., 0]


def block_mask(length: int, block: int) -> torch.Tensor:
    """The mask ``generate`` builds: log of a block-level tril, in bf16, [1, 1, L, L] (0 / -inf)."""
    n = (length + block - 1) // block
    tril = torch.tril(torch.ones(n, n)).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return tril[None, None, :length, :length].log().to(torch.bfloat16)


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


def run(args, workdir: str) -> tuple[dict, dict]:
    ref = import_reference(args.llada2_model)
    path = make_tiny_llada2(os.path.join(workdir, "llada2"), seed=SEED)
    model = ref.LLaDA2MoeModelLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model._sample_with_temperature_topk_topp = greedy_sample
    forward = model.forward

    def forward_fp32_mask(*a, attention_mask=None, **kw):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(torch.float32)
        return forward(*a, attention_mask=attention_mask, **kw)

    model.forward = forward_fp32_mask
    cfg = model.config
    # A bf16 load, as users run it (``.to(bf16)`` of the fp32 model would also round RoPE's inv_freq buffer).
    bf16 = ref.LLaDA2MoeModelLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1000 + SEED)
    n_regular = cfg.mask_token_id - 3  # mask is the 4th special after the regular vocabulary
    tensors: dict[str, torch.Tensor] = {}
    for i, n in enumerate(PROMPT_LENS):
        p = torch.randint(0, n_regular, (n,), generator=gen)
        ids = torch.cat([p, torch.full((CANVAS,), cfg.mask_token_id)])[None]
        tensors[f"prompt.{i}"] = p.clone()
        tensors[f"logits.{i}.input_ids"] = ids[0].contiguous()
        with torch.no_grad():
            logits_record(tensors, f"logits.{i}", model(ids).logits[0].float())
            mask = block_mask(ids.shape[1], MASK_BLOCK).float()
            logits_record(tensors, f"block.{i}", model(ids, attention_mask=mask).logits[0].float())
            logits_record(tensors, f"bf16.{i}", bf16(ids).logits[0].float())
        for name, gen_length, block_length, steps, threshold, eos, minimal_topk in GEN:
            out = model.generate(p[None], temperature=0.0, block_length=block_length, steps=steps,
                                 gen_length=gen_length, threshold=threshold, minimal_topk=minimal_topk,
                                 eos_id=cfg.eos_token_id if eos is None else eos, mask_id=cfg.mask_token_id)
            tensors[f"gen.{name}.{i}.output"] = out[0].contiguous()
    manifest = {"seed": SEED, "checksum": checksum(path), "mask_token_id": cfg.mask_token_id,
                "eos_token_id": cfg.eos_token_id, "prompt_lens": list(PROMPT_LENS), "canvas": CANVAS,
                "logit_cols": LOGIT_COLS, "mask_block": MASK_BLOCK,
                "cases": [dict(zip(("name", "gen_length", "block_length", "steps", "threshold", "eos_id",
                                    "minimal_topk"), c)) for c in GEN]}
    return tensors, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llada2-model", required=True, help="folder with modeling_llada2_moe.py + its config")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        tensors, entry = run(args, workdir)
    save_file(tensors, os.path.join(args.out, "llada2.safetensors"))
    manifest_path = os.path.join(args.out, "manifest.json")
    manifest = {}
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    manifest["llada2"] = entry
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
