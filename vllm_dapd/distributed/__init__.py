"""Serving beyond one engine: replicas behind one OpenAI endpoint with Ray Serve.

Map: ``serve.py`` (the Ray Serve app: an ``Endpoint`` ingress that fails requests over, in front of
one ``vllm-dapd serve`` engine per replica, proxied over loopback and restarted in place when it
dies; the app builder and the ``python -m vllm_dapd.distributed.serve`` launcher), ``routing.py``
(the request router: least loaded first, replicas whose engine is dead left out),
``child.py`` (runs an engine server that exits when the replica process that started it dies).
Tensor parallelism needs nothing here: it is vLLM's own (``--tensor-parallel-size``) over the
models' TP layers; see docs/DISTRIBUTED.md for what runs on which platform.
"""
