"""vllm-dapd: serve masked diffusion LLMs (LLaDA, Dream) in vLLM with dependency-aware parallel decoding."""

__version__ = "0.1.0"

from vllm_dapd.engine.vllm.cost import Cost, cost, scores, trace  # noqa: E402  (per-sequence NFE; no vLLM import)

__all__ = ["Cost", "cost", "scores", "trace", "__version__"]
