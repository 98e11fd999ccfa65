"""`ftp-vllm serve`: vLLM's own OpenAI-compatible server with FTP routing and its metrics.

- ``server.command``  the CLI (``serve``, ``serve-bench``); light imports only
- ``server.settings`` which model, router artifact and default sparsity to serve
- ``server.app``      start-up: vLLM's engine client and app, plus this project's parts
- ``server.validation`` ASGI middleware: per-request ``ftp_sparsity`` checked, HTTP 400
- ``server.metrics``  the ``ftp_`` Prometheus metrics and the worker-stats poller
- ``server.selfbench`` dense-vs-routed prefill self-benchmark (start-up and admin route)
- ``server.routes``   ``/ftp/...`` routes (stats, per-request records, benchmark)
- ``server.bench``    vLLM's benchmark client against routed and dense serving
"""
