"""Deployments' memory against what the engine needs under the KV-cache rule
(ftp_vllm.plugin.memory): the CPU image's documented `docker run --memory` and every
Kubernetes pod's requests and limits. Fast: no engine, `kubectl kustomize` renders."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ftp_vllm.plugin.memory import (
    ENV_KV_SPACE,
    OVERHEAD_BYTES,
    GiB,
    ModelMemory,
    NodeMemory,
    choose_kv_cache,
    minimum_memory,
)
from tests.memory_helpers import SMOLLM2  # the default model, as served (bf16)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
         "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def quantity(text: str) -> int:
    """Bytes of a Kubernetes memory quantity ("16Gi", "512M")."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?|)", str(text).strip())
    assert m, f"unreadable memory quantity {text!r}"
    return int(float(m.group(1)) * UNITS[m.group(2)])


def docker_memory(text: str) -> int:
    """Bytes of `docker run --memory` ("6g", "6144m")."""
    m = re.fullmatch(r"(\d+)([bkmg]?)", text.lower())
    assert m, f"unreadable --memory {text!r}"
    return int(m.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


# --- the CPU image ------------------------------------------------------------------------------
def test_cpu_image_bakes_no_kv_cache_size():
    """The rule reads the container's limit; a baked VLLM_CPU_KVCACHE_SPACE would override it
    (and make a small container fail at start)."""
    code = [line for line in (ROOT / "Dockerfile.cpu").read_text().splitlines()
            if not line.lstrip().startswith("#")]
    assert not any(ENV_KV_SPACE in line for line in code)


def _cpu_docker_runs() -> list[str]:
    found = []
    for path in (ROOT / "Dockerfile.cpu", ROOT / "docs" / "OPERATIONS.md"):
        found += [line for line in path.read_text().splitlines()
                  if "docker run" in line and "-cpu" in line]
    return found


def test_documented_cpu_container_memory_starts_the_default_model():
    runs = _cpu_docker_runs()
    assert len(runs) >= 2  # Dockerfile.cpu's header and docs/OPERATIONS.md
    for line in runs:
        m = re.search(r"--memory[ =](\S+)", line)
        assert m, f"no --memory in {line.strip()!r}: the KV cache is sized from the limit"
        limit = docker_memory(m.group(1))
        assert limit >= minimum_memory(SMOLLM2)
        # At start the API server and the model's page cache already count against the limit.
        used = OVERHEAD_BYTES + SMOLLM2.weights
        choice = choose_kv_cache(NodeMemory(total=limit, available=limit - used,
                                            cgroup_limit=limit), SMOLLM2)
        assert choice.kv_bytes >= SMOLLM2.one_sequence


def test_stated_cpu_minimum_is_enough():
    text = " ".join(line.lstrip("# ") for line in
                    (ROOT / "Dockerfile.cpu").read_text().splitlines())
    m = re.search(r"at least (\d+) GiB", text)
    assert m, "Dockerfile.cpu should state the least container memory"
    assert int(m.group(1)) * GiB >= minimum_memory(SMOLLM2)


# --- Kubernetes ---------------------------------------------------------------------------------
def kustomizations() -> list[str]:
    return sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))


def rendered(kdir: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed to render the kustomizations)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / kdir)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {kdir} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_specs(node: object) -> list[dict]:
    """Every pod spec (a mapping with "containers") inside a rendered object."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            return [node]
        return [s for v in node.values() for s in pod_specs(v)]
    if isinstance(node, list):
        return [s for v in node for s in pod_specs(v)]
    return []


def container_env(docs: list[dict], ctr: dict) -> dict[str, str]:
    env = {e["name"]: str(e.get("value")) for e in ctr.get("env", [])}
    for src in ctr.get("envFrom", []):
        name = src.get("configMapRef", {}).get("name")
        for d in docs:
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name:
                env.update(d.get("data", {}))
    return env


@pytest.mark.parametrize("kdir", kustomizations())
def test_pod_memory_covers_the_engine(kdir):
    """Each serving container: a memory request and limit, request <= limit, and a limit that
    holds the API server, the engine core, one worker per GPU and the default model's weights
    (the KV cache is in GPU memory); no KV-cache size in the environment."""
    docs = rendered(kdir)
    checked = 0
    for doc in docs:
        for spec in pod_specs(doc.get("spec", {})):
            for ctr in spec["containers"]:
                res = ctr.get("resources", {})
                where = f"{kdir}: {doc['kind']} {doc['metadata']['name']}/{ctr['name']}"
                assert "memory" in res.get("limits", {}), f"{where}: no memory limit"
                assert "memory" in res.get("requests", {}), f"{where}: no memory request"
                limit = quantity(res["limits"]["memory"])
                request = quantity(res["requests"]["memory"])
                assert request <= limit, f"{where}: request above limit"
                gpus = int(res["limits"].get("nvidia.com/gpu", 0))
                model = ModelMemory(weights=SMOLLM2.weights, kv_per_token=SMOLLM2.kv_per_token,
                                    max_model_len=SMOLLM2.max_model_len,
                                    max_num_seqs=SMOLLM2.max_num_seqs, workers=max(1, gpus))
                need = minimum_memory(model, kv_on_host=gpus == 0)
                assert request >= need, (
                    f"{where}: request {request / GiB:.1f} GiB < needed {need / GiB:.1f} GiB")
                env = container_env(docs, ctr)
                assert ENV_KV_SPACE not in env, f"{where}: a fixed {ENV_KV_SPACE}"
                checked += 1
    if kdir != "storage":
        assert checked, f"{kdir}: no containers found"
