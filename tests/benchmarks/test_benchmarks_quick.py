"""The throughput and serving benchmarks run end to end in ``--quick`` mode and write sane JSON.

Each starts vLLM engines/servers (tens of seconds each), hence ``slow``. Numbers are not asserted
against the targets (those are measured and reported by the scripts), only their sanity.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_script(name: str, out: Path, *extra: str, timeout: int = 400) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Its own session: on a timeout the whole group gets SIGINT (the script's ``finally`` stops the
    # servers it started in sessions of their own), then SIGKILL (vLLM engine processes included):
    # orphaned engines would otherwise load every later test.
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, stderr = proc.communicate()
        pytest.fail(f"benchmarks/{name} --quick took over {timeout} s: {stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.with_suffix(".json").read_text())


def sane_rate(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_throughput_quick(tmp_path):
    # ~2 minutes alone; a loaded machine (a full suite beside other work) once took over 400 s
    res = run_script("throughput.py", tmp_path / "throughput", timeout=900)
    assert {"config", "headline", "targets", "reference", "dual_loop", "engine", "ar_llama"} <= res.keys()
    cfg = res["config"]
    for loop in ("reference", "dual_loop"):
        r = res[loop]
        assert sane_rate(r["tokens_per_s"]) and 0.0 <= r["accuracy"] <= 1.0
        assert r["nfe"] == pytest.approx(cfg["canvas"])  # one token per step
    combos = {(r["policy"], r["cache_mode"], r["batch"]) for r in res["engine"]}
    assert combos == {(p, m, b) for p in cfg["policies"] for m in ("prefix", "dual") for b in cfg["batches"]}
    for r in res["engine"]:
        assert sane_rate(r["tokens_per_s"]) and 0.0 <= r["accuracy"] <= 1.0
        assert r["tokens"] == cfg["n_prompts"] * cfg["canvas"]
        assert 1.0 <= r["nfe"] <= cfg["steps"]
        if r["policy"] == "low_confidence":
            assert r["nfe"] == pytest.approx(cfg["steps"])
    assert [r["batch"] for r in res["ar_llama"]] == cfg["batches"]
    assert all(sane_rate(r["tokens_per_s"]) for r in res["ar_llama"])
    for name in ("engine_b32_vs_reference_20x", "engine_b32_vs_dual_loop_3x"):
        t = res["targets"][name]
        assert isinstance(t["any_policy_at_equal_accuracy"], bool)
        assert t["measured_best"] is None or t["measured_best"] > 0
    assert res["headline"]["batch"] == 32


def test_serve_quick(tmp_path):
    res = run_script("serve.py", tmp_path / "serve")
    assert {"config", "summary", "raw"} <= res.keys()
    assert len(res["summary"]) == len(res["config"]["rates"]) == len(res["raw"]) >= 2
    for row in res["summary"]:
        assert row["completed"] == res["config"]["num_prompts"] and row["failed"] == 0
        assert sane_rate(row["request_throughput"]) and sane_rate(row["output_throughput"])
        for m in ("ttft", "tpot", "e2el"):
            assert row[f"p50_{m}_ms"] >= 0 and row[f"p99_{m}_ms"] >= row[f"p50_{m}_ms"]
        assert row["accuracy"] is None or 0.0 <= row["accuracy"] <= 1.0
    # the server was stopped: nothing listens on its port any more
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(res["config"]["port"]))) != 0


def test_dependency_quick(tmp_path):
    from vllm_dapd.decoding.registry import available_policies

    res = run_script("dependency.py", tmp_path / "dependency")
    cfg = res["config"]
    assert {"dev", "test"} == set(res["aup"]) == set(cfg["splits"])
    for split, table in res["aup"].items():
        # every registered policy has an AUP row on every family, plus the coupled mean
        assert set(available_policies()) | {"one-token-per-step"} <= set(table)
        for row in table.values():
            assert set(cfg["families"]) | {"coupled"} == set(row)
            assert all(math.isfinite(v) and v >= 0 for v in row.values())
    for split in ("dev", "test"):
        crit = res["criteria"][split]
        assert isinstance(crit["a_holds"], bool) and isinstance(crit["b_holds"], bool)
        assert crit["a_holds"] == all(d <= 2.0 for d in crit["a_drop_at_default"].values())
    anchor = next(r for r in res["results"] if r["curve"] == "one-token-per-step")
    for split in ("dev", "test"):
        for fam in cfg["families"]:
            assert anchor[split][fam]["tpf"] == pytest.approx(1.0)  # one token per forward
            # AUP of the anchor alone is its accuracy (rho = 1)
            assert res["aup"][split]["one-token-per-step"][fam] == pytest.approx(anchor[split][fam]["accuracy"])
    for r in res["results"]:
        for split in ("dev", "test"):
            for m in r[split].values():
                assert 0.0 <= m["accuracy"] <= 100.0 and 1.0 <= m["tpf"] <= cfg["canvas"] + 1e-9


def test_scale_quick(tmp_path):
    res = run_script("scale.py", tmp_path / "throughput_scale")
    cfg = res["config"]
    assert {"config", "sizes", "why_ar_wins_on_cpu"} <= res.keys()
    assert len(cfg["load_average_after"]) == 3 and cfg["repeats"] >= 1
    for s in res["sizes"]:
        assert s["params"] > 0 and s["ar_llama_params"] > 0
        assert [r["batch"] for r in s["step"]] == [r["batch"] for r in s["tokens_per_s"]] == cfg["batches"]
        for r in s["step"]:
            assert sane_rate(r["bare_forward_ms"]) and sane_rate(r["engine_step_over_bare_forward"])
            assert set(r["policy_share"]) == {"low_confidence", "dapd"}
            assert all(sane_rate(x) for x in r["policy_share"].values())
            assert sane_rate(r["memory"]["largest_mib"])
        for r in s["tokens_per_s"]:
            assert sane_rate(r["engine_parallel"]["tokens_per_s"]) and sane_rate(r["ar_llama"]["tokens_per_s"])
            assert r["engine_parallel"]["nfe"] == pytest.approx(cfg["parallel_steps"])
            assert r["ar_llama"]["tokens"] == r["engine_parallel"]["tokens"] == r["batch"] * cfg["canvas"]
            if r["batch"] in cfg["tps_batches"]:
                assert r["engine_one_per_step"]["nfe"] == pytest.approx(cfg["canvas"])
                assert sane_rate(r["engine_one_per_step_over_ar"])


def test_step_overhead_quick(tmp_path):
    """Every case measured against HEAD's own stepper as the baseline: the same code, the same peak;
    one block over the canvas holds at least the canvas logits, blocks of 16 a quarter as much."""
    res = run_script("step_overhead.py", tmp_path / "step_overhead", "--repeats", "1", "--baseline", "HEAD")
    logits = res["config"]["logits_mib"]
    assert logits == 32 * 64 * 4096 * 4 / 2**20
    peaks = {(r["case"], r["variant"]): r["peak_mib"] for r in res["rows"]}
    assert len(peaks) == 8 and all(sane_rate(r["ms"]) for r in res["rows"])
    for case in {c for c, _ in peaks}:
        assert peaks[(case, "current")] == peaks[(case, "baseline HEAD")]
    for case in ("one policy", "two policies interleaved"):
        assert peaks[(case, "current")] >= logits
    for case in ("one policy, blocks of 16", "two policies, blocks of 16"):  # a quarter of the rows
        assert logits / 4 <= peaks[(case, "current")] < peaks[("one policy", "current")] / 3


def test_packing_quick(tmp_path):
    res = run_script("packing.py", tmp_path / "packing", "--repeats", "1")
    assert set(res["summary"]) == {"join", "mixed prompts"}
    for s in res["summary"].values():
        assert sane_rate(s["padded_ms"]) and sane_rate(s["packed_ms"]) and s["row_ratio"] > 1.2
    assert {(r["scenario"], r["variant"]) for r in res["rows"]} == {
        (s, v) for s in ("join", "mixed prompts") for v in ("padded", "packed")}


def test_policy_share_quick(tmp_path):
    res = run_script("policy_overhead.py", tmp_path / "policy_share", "--share")
    assert {(r["canvas"], r["block"]) for r in res["rows"]} == {(32, 32), (128, 32)}
    for r in res["rows"]:
        assert 0 < r["forward_ms"] < r["step_ms"] and 0 < r["policy_ms"] < r["step_ms"]
        assert 0 < r["policy_share"] < 1 and r["policy_share"] <= r["overhead_share"] + 1e-9


def test_attention_paths_quick(tmp_path):
    res = run_script("attention_paths.py", tmp_path / "attention_paths", "--repeats", "1")
    assert len(res["summary"]) == 3 * 2 * 2  # scenarios x dtypes x (MHA, GQA)
    for s in res["summary"].values():
        assert sane_rate(s["portable_ms"]) and sane_rate(s["kernel_ms"])
    assert {r["path"] for r in res["rows"]} == {"portable", "kernel"}


def test_scoring_quick(tmp_path):
    res = run_script("scoring.py", tmp_path / "scoring", "--requests", "1")
    for way in ("per_position", "score_start", "reference_loop"):
        assert sane_rate(res[way]["requests_per_s"])
    # same 32 samples: the reference loop takes 32 / 16 forwards; score_start one forward (its 32 ELBO
    # rows and 24 left-to-right rows, each distinct mask once, fit 2048 tokens); per position packs its
    # distinct rows into 2048-token forwards
    assert res["reference_loop"]["forwards_per_request"] == 2
    assert res["score_start"]["forwards_per_request"] == 1
    assert res["per_position"]["forwards_per_request"] > res["score_start"]["forwards_per_request"]


def test_dapd_conflicts_quick(tmp_path):
    res = run_script("dapd_conflicts.py", tmp_path / "dapd_conflicts")
    study = res["study"]["dev"]["perm"]
    # Where the authors' Staged commits two slots of a permutation with the same item (the earlier
    # 4-layer benchmark model did on 29 of 100 dev prompts; the committed 6-layer one decodes perm
    # one slot per forward under Staged's tau, so none of these 8 prompts fails), every missed pair
    # is a joint same-token step; the same-token rule leaves none.
    staged, fixed = study["staged (authors')"], study["staged + conflict 0.9"]
    assert all(p["kind"] == "joint" and p["same_token"] for p in staged["pairs"])
    assert fixed["summary"]["wrong"] == 0 and not fixed["pairs"]
    acc = res["accuracy_tpf"]["dev"]
    assert acc["one token per step"]["perm"]["tpf"] == 1.0
    assert acc["staged + conflict 0.9"]["perm"]["accuracy"] == 100.0


def test_prefix_cache_quick(tmp_path):
    """Two servers (prefix caching on / off) answer the same prompts identically (the script asserts
    it); with caching on the second request reports the whole shared prompt cached, off none."""
    res = run_script("prefix_cache.py", tmp_path / "prefix_cache")
    on, off = res["summary"]["prefix caching on"], res["summary"]["prefix caching off"]
    assert res["answers_identical_with_and_without_caching"]
    assert on["second"]["mean_cached_tokens"] == res["shared_tokens"] and on["first"]["mean_cached_tokens"] == 0
    assert off["second"]["mean_cached_tokens"] == 0
    for s in (on, off):
        assert all(sane_rate(s[o]["median_first_block_s"]) for o in ("first", "second"))
