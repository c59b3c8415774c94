# syntax=docker/dockerfile:1
# service-slm kv-cache: `slm serve kv-cache`. Build from the repository root:
#   docker build -f docker/kv-cache.Dockerfile -t ghcr.io/service-slm/kv-cache:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
RUN python -m venv /opt/venv \
 && python docker/requirements.py pyproject.toml > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY services services
COPY gateway gateway
# --no-deps: the requirements above are the image's whole dependency set.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 slm \
 && useradd --system --uid 10001 --gid slm --home-dir /tmp --shell /usr/sbin/nologin slm
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["slm"]
CMD ["serve", "kv-cache"]
