"""Workers that build the diffusion runner instead of vLLM's: one class per platform, same runner mixin.

The GPU worker builds its runner through ``_make_model_runner`` (vllm/v1/worker/gpu_worker.py);
the CPU worker builds it inline in ``init_device`` (vllm/v1/worker/cpu_worker.py), so there we let
it and swap ours in. Every other worker duty (distributed init, memory accounting, KV cache sizing)
stays vLLM's. Both vLLM modules import on either platform
(``cpu_worker`` itself subclasses the GPU ``Worker``); ``hooks`` names the class to use.
"""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from .runner import DiffusionRunnerMixin


class DiffusionCPUModelRunner(DiffusionRunnerMixin, CPUModelRunner):
    pass


class DiffusionGPUModelRunner(DiffusionRunnerMixin, GPUModelRunner):
    pass


class DiffusionCPUWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        self.model_runner = DiffusionCPUModelRunner(self.vllm_config, torch.device("cpu"))


class DiffusionGPUWorker(Worker):
    def _make_model_runner(self) -> DiffusionGPUModelRunner:  # the GPU worker's factory hook
        return DiffusionGPUModelRunner(self.vllm_config, self.device)
