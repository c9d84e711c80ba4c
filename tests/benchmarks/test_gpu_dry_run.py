"""``benchmarks/gpu/run.py --cpu --tiny``: the device benchmark's plumbing, on CPU, with vLLM unimportable.

The device machines have PyTorch + CUDA but no vLLM (and maybe no transformers): the script runs
here in a subprocess whose meta-path hook makes ``import vllm`` (and transformers, tokenizers,
safetensors) raise, so any import of them on the script's path fails the run. CPU vs CPU must be
token-identical; the scale section must fill every run it promises; the time guard must skip, not
overrun.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"
BLOCKED = ("vllm", "transformers", "tokenizers", "safetensors")

HOOK = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_blocked(out: Path, *extra: str) -> dict:
    code = HOOK.format(blocked=set(BLOCKED))
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPT), "--cpu", "--tiny", "--threads", "1",
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "cpu.json").read_text())


def test_cpu_tiny_dry_run_without_vllm(tmp_path):
    res = run_blocked(tmp_path)
    assert res["errors"] == []
    assert res["meta"]["importable"] == {"vllm": False, "transformers": False}

    from vllm_dapd.decoding import available_policies

    variants = res["meta"]["correctness_variants"]
    assert {"dapd_staged", "dapd_direct", "dapd_staged_tau005"} <= set(variants)
    policies = sorted(available_policies() + list(variants))
    corr = res["correctness"]
    assert corr["source"].startswith("in memory")  # tiny.py needs transformers: the fallback ran
    for arch in ("llada", "dream"):
        c = corr[arch]
        assert c["logits_max_abs_diff"] == 0.0 and c["attention_max_abs_diff"] == 0.0
        assert sorted(c["reference_loop"]) == policies and sorted(c["stepper"]) == policies
        checks = list(c["reference_loop"].values()) + [v for p in c["stepper"].values() for v in p.values()]
        assert len(checks) == 4 * len(policies)
        assert all(v["identical"] and v["mismatched_tokens"] == 0 for v in checks), checks
        assert c["identical"] == f"{len(checks)}/{len(checks)}"

    assert corr["llada2"]["skipped"].startswith("needs transformers")  # LLaDA2's config class needs it
    plan = res["meta"]["plan"]
    for arch in ("llada_8b", "dream_7b"):
        s = res["scale"][arch]
        assert s["forward"]["ms"] > 0 and s["yardstick"]["nfe"] == plan["gen"] and s["yardstick"]["tok_s"] > 0
        runs = [r for r in s["runs"] if "tok_s" in r]
        # 2 fixed-steps configs x every batch x every labelled run, plus the batch-1 one-token-per-step runs
        labels = res["meta"]["policies"]
        assert {"dapd", "dapd_staged", "dapd_direct"} <= set(labels)
        assert len(runs) == len(s["runs"]) == 2 * len(plan["batches"]) * len(labels) + len(labels)
        for r in runs:
            assert math.isfinite(r["tok_s"]) and r["tok_s"] > 0
            assert 1 <= r["nfe_mean"] <= r["nfe_budget"]
            assert abs(sum(r["share"].values()) - 1) < 1e-6 and 0 <= r["share"]["policy"] <= 1
            assert r["kv_pages_gib"] > 0  # prefix/dual runs page their KV
        fixed = [r for r in runs if r["config"].startswith("blocks") and "fixed" in r["config"]]
        assert {r["nfe_budget"] for r in fixed} == {plan["fixed_steps"]}
        assert s["summary"]["dapd_policy_share_max"] is not None
        assert s["summary"]["target_applies"] is False and s["summary"]["dapd_policy_share_met"] is None
    assert (tmp_path / "cpu.png").stat().st_size > 0


def test_time_guard_skips_instead_of_overrunning(tmp_path):
    res = run_blocked(tmp_path, "--budget", "1")
    assert res["errors"] == []
    for arch in ("llada", "dream"):
        entries = list(res["correctness"][arch]["reference_loop"].values())
        assert entries and all(v == "skipped: time" for v in entries)
    assert all(res["scale"][a].get("skipped") == "skipped: time" for a in ("llada_8b", "dream_7b"))


def test_tiny_checkpoints_are_used_when_their_dependencies_import(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench_run", SCRIPT)
    gpu_run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu_run  # its dataclasses look their module up
    spec.loader.exec_module(gpu_run)
    models, source = gpu_run.tiny_models(str(tmp_path))
    assert source == "vllm_dapd/models/tiny.py checkpoints"
    assert models["llada"].logits_shift == 0 and models["dream"].logits_shift == 1
    # LLaDA2 (block-causal MoE): logits and the block-diffusion loop, with and without block KV reuse
    out = gpu_run.block_diffusion_pair(gpu_run.torch.device("cpu"), gpu_run.Clock(60.0), 1.0)
    assert out["identical"] is True and out["logits_max_abs_diff"] == 0.0
    assert out["kv_cache_False"]["identical"] and out["kv_cache_True"]["identical"]
