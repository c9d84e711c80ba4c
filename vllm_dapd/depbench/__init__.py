"""The dependency benchmark: task families whose answer positions are coupled in different ways
(``tasks``), and ``CHECKPOINT``, a tiny LLaDA-layout model trained on them (``training/depbench.py``) that
``benchmarks/dependency.py`` runs every decoding policy on through ``vllm.LLM``."""

import os

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint")
