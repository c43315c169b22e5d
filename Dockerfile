# digit-gen service: the base package (FastAPI + ONNX Runtime, no torch) and the bundled models.
#   docker build -t digit-gen .                        CPU image (default target)
#   docker build --target cuda -t digit-gen:cuda .     CUDA 13 + cuDNN 9 runtime, as onnxruntime-gpu 1.27+ needs
ARG PYTHON_IMAGE=python:3.12-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# --- build: a virtual environment with the service's dependencies only ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

# --- cuda: the same service on NVIDIA's CUDA runtime (python from Ubuntu, so the venv is built here) ---
FROM ${CUDA_IMAGE} AS cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 --no-create-home app
WORKDIR /app
COPY pyproject.toml README.md /tmp/src/
COPY service /tmp/src/service
COPY training /tmp/src/training
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install /tmp/src && rm -rf /tmp/src
COPY exported /app/exported
ENV PATH=/opt/venv/bin:$PATH DIGITGEN_MODELS_DIR=/app/exported DIGITGEN_HOST=0.0.0.0 DIGITGEN_PORT=8000 \
    DIGITGEN_WORKERS=1 DIGITGEN_PROVIDERS=cuda
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["python", "-m", "service"]

# --- cpu (default): slim Python, non-root ---
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY exported /app/exported
# DIGITGEN_WORKERS unset: one worker per CPU the container may use (affinity and --cpus quota)
ENV PATH=/opt/venv/bin:$PATH DIGITGEN_MODELS_DIR=/app/exported DIGITGEN_HOST=0.0.0.0 DIGITGEN_PORT=8000
USER 10001
EXPOSE 8000
# urlopen raises on any status but 2xx, so a 503 from /readyz marks the container unhealthy
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["python", "-m", "service"]
