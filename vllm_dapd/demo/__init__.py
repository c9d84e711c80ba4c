"""The embedded demo model: synthetic tasks, a word-level tokenizer and the shipped checkpoint
(``CHECKPOINT``), a tiny LLaDA-layout masked diffusion LM that ``vllm serve`` can use offline and
the accuracy benchmark measures policies on; ``training/demo.py`` (outside the package) trains it."""

import os

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint")
