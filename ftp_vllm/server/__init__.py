"""`ftp-vllm serve`: vLLM's own OpenAI-compatible server with FTP routing and its metrics.

- ``command``    the CLI (``serve``, ``serve-bench``); light imports only
- ``settings``   which model, router artifact and default sparsity to serve
- ``app``        start-up: vLLM's engine client and app, plus this project's parts
- ``validation`` ASGI middleware: per-request ``ftp_sparsity`` checked, HTTP 400
- ``metrics``    the ``ftp_`` Prometheus metrics and the worker-stats poller
- ``selfbench``  dense-vs-routed prefill self-benchmark (start-up and admin route)
- ``routes``     ``/ftp/...`` routes (stats, per-request records, benchmark)
- ``client``     HTTP helpers for a served ftp-vllm (JSON calls, ``/metrics`` samples)
- ``process``    a served ftp-vllm as a child process (serve-bench, end-to-end tests)
"""
