"""The diffusion engine's vLLM-free core: a request's resolved plan (``settings``), its denoising
state (``sequence``), one step's layout and batch (``layout``, ``stepper``), the KV pages (``kv``),
scoring (``scoring``) and the offline runner (``offline.run``). Nothing here imports vLLM
(``tests/engine/test_offline.py`` checks it); ``vllm_dapd.engine.vllm`` wires it into vLLM."""

from .offline import Request, Result, run  # noqa: E402,F401  (the public offline runner)
