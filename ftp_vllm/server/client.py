"""Talking to a served ftp-vllm over HTTP on loopback: JSON calls, `/metrics` samples, a free
port. Used by `ftp-vllm serve-bench` and by the end-to-end tests."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_json(url: str, body: Any = None, method: str | None = None,
              timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else
                                      json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def scrape(base_url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as r:
        return r.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample's value from Prometheus text (labels must match exactly those given)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and (labels is None or all(
                    s.labels.get(k) == v for k, v in labels.items())):
                return float(s.value)
    return None


def metric_sum(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(float(s.value) for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == name)
