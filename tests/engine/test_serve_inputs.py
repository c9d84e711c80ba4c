"""A real ``vllm serve --plugin dapd`` (no model: the demo as ``dapd-demo``) against hostile input.

One server for the module. The issue's crashers (1e30, 2**63, 30-digit strings, true, NaN) are 400s
naming the key and the server keeps answering correctly; a 10-token request with block_length 4096
stays a 10-position canvas; a request without max_tokens or vllm_xargs gets the checkpoint's
defaults (answer length 10, block 10) and answers right; ``--dtype float32`` keeps fp32; ignored
sampling options are logged; the README's quick-start curl runs as pasted.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vllm_dapd.demo.tasks import TASKS, held_out, is_correct

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    log_path = tmp_path_factory.mktemp("serve_inputs") / "server.log"
    with start_server(["--plugin", "dapd", "--dtype", "float32"], log_path,
                      env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"}) as (base, proc):
        yield base, int(base.rsplit(":", 1)[1]), log_path, proc


def post(base: str, body: dict | str, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, str) else json.dumps(body)
    req = urllib.request.Request(base + path, data=data.encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


ITEMS = [held_out(task, 1)[0] for task in TASKS]


def ask(base: str, item, **body) -> dict:
    body = {"model": "dapd-demo", "temperature": 0, "messages": [{"role": "user", "content": item.prompt}], **body}
    status, out = post(base, body)
    assert status == 200, out
    return out


def assert_serves_correctly(base: str) -> None:
    for item in ITEMS:
        text = ask(base, item)["choices"][0]["message"]["content"]
        assert is_correct(item, text), (item.prompt, text)


def test_demo_is_served_as_dapd_demo_and_answers_a_plain_request(server):
    base, _, log_path, _ = server
    with urllib.request.urlopen(base + "/v1/models") as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["dapd-demo"]
    # No max_tokens, no vllm_xargs: the checkpoint's generation_config.json decides (10 tokens, block 10).
    out = ask(base, ITEMS[0])
    assert out["usage"]["completion_tokens"] <= 10
    assert_serves_correctly(base)
    assert re.search(r"dtype=torch\.float32", log_path.read_text()), "--dtype float32 did not keep fp32"


# 2**63 is written as a JSON number; NaN as JSON's non-standard NaN (Python clients send it).
HOSTILE = [
    ('"steps": 1e30', "steps"), ('"steps": 9223372036854775808', "steps"), ('"steps": "%s"' % ("1" * 30), "steps"),
    ('"diffusion_max_steps": 1e30', "steps"), ('"block_length": 1e30', "block_length"),
    ('"block_length": 9223372036854775808', "block_length"), ('"block_length": true', "block_length"),
    ('"block_length": NaN', "block_length"), ('"policy": "dapd", "max_per_step": 9223372036854775808', "max_per_step"),
    ('"policy": "threshold", "threshold": NaN', "threshold"), ('"trace": 1.5', "trace"),
]


@pytest.mark.parametrize("xargs,key", HOSTILE)
def test_hostile_settings_are_400_naming_the_key(server, xargs, key):
    base = server[0]
    body = ('{"model": "dapd-demo", "max_tokens": 10, "messages": [{"role": "user", "content": "sort 1 2"}], '
            '"vllm_xargs": {%s}}' % xargs)
    status, out = post(base, body)
    assert status == 400, out
    assert out["error"]["message"].startswith(key + ":") or f"'{key}'" in out["error"]["message"], out


def test_hostile_seed_and_temperature_are_400(server):
    base = server[0]
    for extra, key in (('"seed": 9223372036854775808', "seed"), ('"temperature": NaN', "temperature")):
        body = '{"model": "dapd-demo", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], %s}' % extra
        status, out = post(base, body)
        assert status == 400 and key in out["error"]["message"], out


def test_server_survives_and_a_huge_block_stays_a_short_canvas(server):
    base, _, _, proc = server
    t0 = time.time()
    out = ask(base, ITEMS[0], max_tokens=10, vllm_xargs={"block_length": 4096, "steps": 10})
    # Block clamped to the 10-token answer: at most 10 forwards, not a 4000-position canvas.
    assert out["metrics"]["speculative_decoding"]["num_spec_steps"] <= 10, out.get("metrics")
    assert time.time() - t0 < 10
    assert is_correct(ITEMS[0], out["choices"][0]["message"]["content"])
    assert proc.poll() is None
    assert_serves_correctly(base)


def test_ignored_sampling_options_are_logged(server):
    base, _, log_path, _ = server
    # Sampled (vLLM resets top_p/top_k of a greedy request to neutral before we see them).
    ask(base, ITEMS[1], temperature=0.7, seed=1, top_p=0.5, top_k=3)
    deadline = time.time() + 15  # the server's stdout is a file: block-buffered
    while not re.search(r"top_p, top_k ignored", log_path.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    assert re.search(r"top_p, top_k ignored", log_path.read_text())


def test_readme_quick_start_curl_runs_as_pasted(server):
    _, port, _, _ = server
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    curls = [b for b in re.findall(r"```bash\n(.*?)```", quick, re.S) if b.lstrip().startswith("curl")]
    assert curls, "no curl snippet in the README's quick start"
    script = curls[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)["choices"][0]["message"]["content"]
    prompt = json.loads(re.search(r"-d '(.*)'", script, re.S).group(1))["messages"][0]["content"]
    assert prompt.startswith("sort "), "the test checks the README's sort example"
    assert answer.split() == sorted(prompt.split()[1:], key=int), (prompt, answer)


# ---------------------------------------------------------------- infilling (OpenAI ``suffix``)

CHAT = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def infill_cases(n: int):
    """(prompt, suffix, country) with the first half of one city hidden (tests/demo/test_demo_engine.py)."""
    import random

    from vllm_dapd.demo.tasks import CITIES

    rng = random.Random("serve-infill")
    cases = []
    for _ in range(n):
        countries = [rng.choice(sorted(CITIES)) for _ in range(4)]
        words = " ".join(rng.choice(CITIES[c]) for c in countries).split()
        k = 2 * rng.randrange(4)
        prompt = CHAT.format("cities " + " ".join(countries)) + " ".join(words[:k])
        cases.append((prompt, " ".join(words[k + 1:]) + "<|eot_id|><|endoftext|>", countries[k // 2]))
    return cases


def test_suffix_infills_through_the_openai_client(server):
    openai = pytest.importorskip("openai")
    from vllm_dapd.demo.tasks import CITIES

    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")
    right = 0
    for prompt, suffix, country in infill_cases(6):
        out = client.completions.create(model="dapd-demo", prompt=prompt, suffix=suffix, max_tokens=1, temperature=0,
                                        logprobs=1, extra_body={"vllm_xargs": {"policy": "dapd"}})
        choice = out.choices[0]
        right += f"{choice.text.strip()} {suffix.split('<')[0].split()[0]}" in CITIES[country]
        assert choice.model_extra["dapd"]["nfe"] == 1 and len(choice.logprobs.tokens) == 1
        assert out.usage.prompt_tokens > len(prompt.split())  # vLLM counts hole + suffix as prompt
        stream = client.completions.create(model="dapd-demo", prompt=prompt, suffix=suffix, max_tokens=1,
                                           temperature=0, stream=True, extra_body={"vllm_xargs": {"policy": "dapd"}})
        assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text
    assert right >= 5, f"{right} of 6 infilled cities are valid"


def test_suffix_with_n_seed_stop_and_a_longer_hole(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")
    prompt, suffix, _ = infill_cases(1)[0]
    kw = dict(model="dapd-demo", prompt=prompt, suffix=suffix, max_tokens=4, temperature=0.9, seed=3)
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert all(c.model_extra["dapd"]["committed_tokens"] == 4 for c in a.choices)
    first = a.choices[0].text.split()[0]
    cut = client.completions.create(n=2, stop=[first], **kw)  # a stop string cuts the filled text
    assert cut.choices[0].finish_reason == "stop" and first not in cut.choices[0].text.split()


@pytest.mark.parametrize("suffix,key", [("", "suffix"), ("vegas <|mdm_mask|> x", "suffix"),
                                        ("1 " * 5000, "suffix")])
def test_bad_suffix_is_400_naming_it(server, suffix, key):
    status, out = post(server[0], {"model": "dapd-demo", "prompt": "cities usa", "suffix": suffix, "max_tokens": 2},
                       "/v1/completions")
    assert status == 400, out
    assert out["error"]["message"].startswith(key + ":"), out
    status, out = post(server[0], {"model": "dapd-demo", "prompt": "a <|mdm_mask|> b", "suffix": "c", "max_tokens": 2},
                       "/v1/completions")
    assert status == 400 and out["error"]["message"].startswith("prompt:"), out


def test_use_beam_search_is_400_naming_it(server):
    base = server[0]
    for path, body in (("/v1/completions", {"prompt": "reverse 1 2 3 4 5 6"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "reverse 1 2 3 4 5 6"}]})):
        body = {"model": "dapd-demo", "max_tokens": 10, "n": 2, "use_beam_search": True, **body}
        status, out = post(base, body, path)
        assert status == 400, out
        assert out["error"]["message"].startswith("use_beam_search:"), out
    assert_serves_correctly(base)


# ---------------------------------------------------------------- choices by likelihood

def test_structured_choice_answers_by_likelihood(server):
    """``structured_outputs: {"choice": [...]}``: the answer is one of the choices, the one with the
    highest of the returned ``dapd.scores``; the demo's right answer wins against corrupted ones."""
    import random

    from vllm_dapd.demo.choices import choices

    base = server[0]
    rng = random.Random(5)
    for item in ITEMS:
        options, right = choices(item, rng)
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": item.prompt}]}),
                           ("/v1/completions", {"prompt": CHAT.format(item.prompt)})):
            status, out = post(base, {"model": "dapd-demo", "temperature": 0, "seed": 1, **body,
                                      "structured_outputs": {"choice": options}, "vllm_xargs": {"score_samples": 8}},
                               path)
            assert status == 200, out
            choice = out["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            got = choice["dapd"]["scores"]
            assert len(got) == len(options) and text.strip() == options[max(range(len(got)), key=got.__getitem__)]
            assert text.strip() == options[right], (item.prompt, options, got)
    # streamed: the same answer, the scores on the chunk that finishes the choice
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    chunks = [c.choices[0] for c in client.completions.create(
        model="dapd-demo", prompt=CHAT.format(item.prompt), temperature=0, seed=1, stream=True,
        extra_body={"structured_outputs": {"choice": options}, "vllm_xargs": {"score_samples": 8}}) if c.choices]
    assert "".join(c.text for c in chunks).strip() == text.strip()
    assert chunks[-1].model_extra["dapd"]["scores"] == got


@pytest.mark.parametrize("structured,key", [
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": [str(i) for i in range(65)]}, "structured_outputs.choice"),
    ({"choice": ["", "1"]}, "structured_outputs.choice"), ({"regex": "[0-9]+"}, "structured_outputs"),
    ({"json": {"type": "object"}}, "structured_outputs")])
def test_bad_or_unsupported_structured_outputs_are_400(server, structured, key):
    status, out = post(server[0], {"model": "dapd-demo", "max_tokens": 4, "structured_outputs": structured,
                                   "messages": [{"role": "user", "content": "sort 1 2"}]})
    assert status == 400, out
    assert out["error"]["message"].startswith(key + ":"), out


def test_readme_infilling_curl_runs_as_pasted(server):
    _, port, _, _ = server
    section = (ROOT / "README.md").read_text().split("## Infilling and choices", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"```bash\n(.*?)```", section, re.S)[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    body = json.loads(re.search(r"-d '(.*)'", script, re.S).group(1))
    assert body["suffix"].startswith("vegas ")
    assert json.loads(out.stdout)["choices"][0]["text"].strip() == "las"


def test_readme_choices_curl_runs_as_pasted(server):
    """README's choices example: the sorted choice wins, and its score is the highest of the list."""
    _, port, _, _ = server
    section = (ROOT / "README.md").read_text().split("## Infilling and choices", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"```bash\n(.*?)```", section, re.S)[1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    options = json.loads(re.search(r"-d '(.*)'", script, re.S).group(1))["structured_outputs"]["choice"]
    choice = json.loads(out.stdout)["choices"][0]
    scores = choice["dapd"]["scores"]
    assert choice["message"]["content"].strip() == "2 3 5 7 9 9 9 9" == options[scores.index(max(scores))]
