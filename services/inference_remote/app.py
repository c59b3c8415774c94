"""Builds inference-remote from settings: upstream clients, pools, health probing, adapters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import grpc
from prometheus_client import CollectorRegistry

from inference_remote.config import InferenceRemoteConfig, UpstreamConfig
from inference_remote.core import AdapterRef, ModelPool, RemoteInference, RemoteMetrics
from inference_remote.pool import Pool, Upstream
from inference_remote.servicer import RemoteInferenceServicer
from inference_remote.upstream import Timeouts, UpstreamClient
from slm.discovery import Connector
from slm.errors import FailedPrecondition, from_rpc_error
from slm.runtime import Runtime
from slm.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)


def read_api_key(upstream: UpstreamConfig) -> str | None:
    """The upstream's bearer key from its secret file or environment variable."""
    if upstream.api_key_file is not None:
        try:
            key = upstream.api_key_file.expanduser().read_text().strip()
        except OSError as error:
            raise FailedPrecondition(
                f"upstream {upstream.name!r}: cannot read api_key_file: {error.strerror}"
            ) from error
        if not key:
            raise FailedPrecondition(f"upstream {upstream.name!r}: api_key_file is empty")
        return key
    if upstream.api_key_env is not None:
        key = os.environ.get(upstream.api_key_env, "").strip()
        if not key:
            raise FailedPrecondition(
                f"upstream {upstream.name!r}: environment variable {upstream.api_key_env} is unset"
            )
        return key
    return None


class RegistryAdapters:
    """AdapterSource over AdapterRegistryService."""

    def __init__(self, connector: Connector, address: str) -> None:
        self._stub = adapters_pb2_grpc.AdapterRegistryServiceStub(connector.channel(address))

    async def get(self, name: str) -> AdapterRef:
        try:
            reply = await self._stub.GetAdapter(
                adapters_pb2.GetAdapterRequest(name=name), timeout=60
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        a = reply.adapter
        return AdapterRef(
            name=a.name,
            base_model=a.base_model,
            peft=a.format == adapters_pb2.ADAPTER_FORMAT_PEFT,
            sha256=a.sha256,
            path=a.path,
            store_path=a.store_path,
            tiers=tuple({1: "local", 2: "gpu", 3: "external"}.get(int(t), "") for t in a.tiers),
        )


class InferenceRemoteApp:
    service_names: tuple[str, ...] = (
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    )

    def __init__(
        self,
        config: InferenceRemoteConfig,
        connector: Connector,
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.metrics = RemoteMetrics(registry)
        c = config
        timeouts = Timeouts(c.connect_timeout_s, c.first_token_timeout_s, c.read_timeout_s)
        self._clients: list[UpstreamClient] = []
        models = []
        for model in c.models:
            upstreams = []
            for u in model.upstreams:
                client = UpstreamClient(
                    u.url, timeouts, api_key=read_api_key(u), max_connections=u.max_concurrency
                )
                self._clients.append(client)
                upstreams.append(
                    Upstream(
                        name=u.name,
                        kind=u.kind,
                        model=u.model or model.name,
                        max_concurrency=u.max_concurrency,
                        client=client,
                        adapter_mount=u.adapter_mount,
                    )
                )
            pool = Pool(
                model.name, upstreams, affinity_slack=c.affinity_slack, on_health=self._on_health
            )
            models.append(ModelPool(model.name, pool, model.context_length))
        self._adapters: RegistryAdapters | None = None
        if c.adapter_registry:
            self._adapters = RegistryAdapters(connector, c.adapter_registry)
        self.core = RemoteInference(
            models,
            self.metrics,
            external_allowlist=c.external_allowlist,
            max_attempts=c.max_attempts,
            queue_timeout_s=c.queue_timeout_s,
            prefix_affinity_chars=c.prefix_affinity_chars,
            adapters=self._adapters,
        )
        self._prober: asyncio.Task[None] | None = None

    def _on_health(self, pool: Pool, upstream: Upstream) -> None:
        self.metrics.healthy.labels(pool.model, upstream.name).set(1 if upstream.healthy else 0)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            RemoteInferenceServicer(self.core), server
        )

    async def start(self) -> None:
        # One probe round first, so the first requests see real health. No upstream up (or
        # none configured) still makes a ready service: it answers UNAVAILABLE per request.
        for pool in self.core.pools():
            await pool.probe_all()
        self._prober = asyncio.create_task(self._probe_forever())
        log.info("inference-remote started", extra={"models": [m.name for m in self.config.models]})

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            for pool in self.core.pools():
                try:
                    await pool.probe_all()
                except Exception:
                    log.exception("health probe round failed", extra={"model": pool.model})

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        for client in self._clients:
            await client.aclose()


def build_app(config: InferenceRemoteConfig, runtime: Runtime) -> InferenceRemoteApp:
    return InferenceRemoteApp(config, runtime.connector, runtime.registry)
