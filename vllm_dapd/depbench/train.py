"""Train the dependency-benchmark model: ``python -m vllm_dapd.depbench.train``.

The demo's trainer (``vllm_dapd.demo.train``: LLaDA SFT objective, tiny LLaDA layout, seeded and
deterministic for a fixed step count) on the ``depbench`` task suite; its periodic eval line uses
the dev split (the test split is only touched by the benchmark's report).
"""

from __future__ import annotations

from vllm_dapd.demo.train import Suite, main as demo_main
from vllm_dapd.depbench import tasks

SUITE = Suite(tasks.TASKS, tasks.CANVAS, tuple(tasks.all_words()), tasks.train_stream,
              lambda task, n: tasks.held_out(task, n, "dev"), "vllm_dapd/depbench/checkpoint")


def main(argv: list[str] | None = None) -> None:
    demo_main(argv, SUITE)


if __name__ == "__main__":
    main()
