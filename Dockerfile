# digit-gen service: the base package (FastAPI + ONNX Runtime, no torch) and the bundled models.
#   docker build -t digit-gen .                        CPU image (default target): ONNX Runtime's CPU build
#   docker build --target cuda -t digit-gen:cuda .     CUDA 13 + cuDNN 9 runtime, as onnxruntime-gpu 1.27+ needs
# podman builds OCI images by default, which have no HEALTHCHECK: `podman build --format docker` keeps it.
# Built and run by `make image-test` (tests/image/image_test.sh).
ARG PYTHON_IMAGE=python:3.12-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# --- build: a virtual environment with the service's dependencies only ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject.toml gives Linux x86-64 ONNX Runtime's GPU build, so that `pip install .` uses a GPU where there
# is one; this image takes the CPU build (78 MB installed, against 340). Both are the `onnxruntime` module, so
# never both: the dependencies with the CPU build in place of the GPU one, then the package without them.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
        deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
        print(*(d.split(';')[0] if d.startswith('onnxruntime') else d \
                for d in deps if not d.startswith('onnxruntime-gpu')), sep='\n')" > requirements.txt \
    && python -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.txt
COPY README.md ./
COPY service ./service
COPY training ./training
# pip and setuptools have done their work: the service never installs anything
RUN /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/pip uninstall --yes pip setuptools

# --- cuda: the same service on NVIDIA's CUDA runtime (python from Ubuntu, so the venv is built here) ---
FROM ${CUDA_IMAGE} AS cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 --create-home app
WORKDIR /app
COPY pyproject.toml README.md /tmp/src/
COPY service /tmp/src/service
COPY training /tmp/src/training
# pyproject.toml's dependencies: ONNX Runtime's GPU build on Linux x86-64
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install /tmp/src && rm -rf /tmp/src
COPY exported /app/exported
# DIGITGEN_WORKERS unset: one worker per CPU on CUDA too, handing their batches to one inference process that
# holds the GPU sessions (DIGITGEN_GPU_SESSIONS=shared; its ONNX Runtime arena capped at 6 GB)
ENV PATH=/opt/venv/bin:$PATH DIGITGEN_MODELS_DIR=/app/exported DIGITGEN_HOST=0.0.0.0 DIGITGEN_PORT=8000 \
    DIGITGEN_PROVIDERS=cuda
USER 10001
EXPOSE 8000
# the probe follows DIGITGEN_PORT, so a container started on another port is probed there
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DIGITGEN_PORT', '8000') + '/readyz', timeout=2)"]
CMD ["python", "-m", "service"]

# --- cpu (default): slim Python, non-root ---
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONUNBUFFERED=1
# a home of its own (/home/app): ONNX Runtime writes there
RUN useradd --system --uid 10001 --create-home app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY exported /app/exported
# DIGITGEN_WORKERS unset: one worker per CPU the container may use (affinity and the --cpus quota)
ENV PATH=/opt/venv/bin:$PATH DIGITGEN_MODELS_DIR=/app/exported DIGITGEN_HOST=0.0.0.0 DIGITGEN_PORT=8000 \
    DIGITGEN_PROVIDERS=cpu
USER 10001
EXPOSE 8000
# urlopen raises on any status but 2xx, so a 503 from /readyz marks the container unhealthy; the
# probe follows DIGITGEN_PORT, so a container started on another port is probed there
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DIGITGEN_PORT', '8000') + '/readyz', timeout=2)"]
CMD ["python", "-m", "service"]
