"""Slow and vanished clients: a reader that stops never stalls the batch or other streams, holds
its slot only up to a configured bound, and what is kept for it stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers import DEFAULT_MODEL, Mesh, mesh_settings, metric_value, until, wait_for
from prometheus_client import CollectorRegistry

from inference_local.config import InferenceLocalConfig, ModelConfig
from inference_local.engine import Delta, End, Engine, Event, Finish, Request
from inference_local.sampling import Sampling
from mesh.settings import Settings
from slm.errors import DeadlineExceeded

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
# End-of-generation banned: a stream runs to max_tokens, however the model would end it.
NO_EOS = {1: -100.0, 106: -100.0}


def long_request(model: str, max_tokens: int, seed: int) -> Request:
    sampling = Sampling(max_tokens=max_tokens, temperature=0.8, seed=seed, logit_bias=NO_EOS)
    return Request(model, sampling, prompt="Write a long story about a lighthouse keeper.")


def count(engine: Engine, model: str, reason: str) -> float:
    return float(engine.metrics.requests.labels(model, reason)._value.get())


def running(engine: Engine, model: str) -> float:
    return float(engine.metrics.running.labels(model)._value.get())


async def read_all(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


@pytest.fixture
async def engine(model_path: object) -> AsyncIterator[Engine]:
    # Small bounds: a reader is stalled after 0.5 s of untaken output or 24 untaken steps.
    config = InferenceLocalConfig(
        models=[ModelConfig(name="two", path=MODEL_FILE, parallel=2, context_length=1024)],
        keep_alive_s=0,
        stall_timeout_s=0.5,
        max_undelivered_steps=24,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def test_a_reader_that_stops_frees_its_slot_and_others_complete(engine: Engine) -> None:
    stalled = engine.generate(long_request("two", 900, seed=1))
    assert isinstance(await anext(stalled), Delta)  # it runs; its reader takes nothing more
    # Another stream shares the batch and runs to its end while the first one's reader stalls.
    other = await read_all(engine.generate(long_request("two", 120, seed=2)))
    end = other[-1]
    assert isinstance(end, End)
    assert (end.finish, end.completion_tokens) == (Finish.LENGTH, 120)
    await until(lambda: count(engine, "two", "stalled") == 1)
    await until(lambda: running(engine, "two") == 0)
    # Both slots are free again: two new streams run at once.
    both = await asyncio.gather(
        *(read_all(engine.generate(long_request("two", 8, seed=s))) for s in (3, 4))
    )
    assert all(isinstance(events[-1], End) for events in both)
    # The reader, back, gets what was kept for it, then why the stream stopped; never an End.
    kept: list[Event] = []

    async def come_back() -> None:
        async for event in stalled:
            kept.append(event)

    with pytest.raises(DeadlineExceeded) as raised:
        await come_back()
    assert raised.value.reason == "READER_STALLED"
    assert not any(isinstance(event, End) for event in kept)


async def test_output_kept_for_a_stalled_reader_is_bounded(model_path: object) -> None:
    # A stall timeout the test never reaches: only the limit on untaken output stops it.
    config = InferenceLocalConfig(
        models=[ModelConfig(name="one", path=MODEL_FILE, parallel=1, context_length=1024)],
        keep_alive_s=0,
        stall_timeout_s=3600,
        max_undelivered_steps=16,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    try:
        stalled = engine.generate(long_request("one", 900, seed=5))
        assert isinstance(await anext(stalled), Delta)
        await until(lambda: count(engine, "one", "stalled") == 1)
        await until(lambda: running(engine, "one") == 0)
        with pytest.raises(DeadlineExceeded, match="left 16 steps of output untaken"):
            await read_all(stalled)
        # The slot serves the next request.
        events = await read_all(engine.generate(long_request("one", 8, seed=6)))
        assert isinstance(events[-1], End)
        assert events[-1].completion_tokens == 8
    finally:
        await engine.close()


async def test_a_slow_reader_that_keeps_up_is_not_stopped(engine: Engine) -> None:
    """A reader slower than the engine but never leaving output untaken for the stall bound
    (each take empties its queue) completes: only output waiting counts, not the stream's age."""
    stream = engine.generate(long_request("two", 60, seed=7))
    events: list[Event] = []
    async for event in stream:
        events.append(event)
        # Slower than a decode step, well inside the 0.5 s bound: a reader's pace, which no
        # condition in the engine expresses (the engine's token counter is not per stream).
        await asyncio.sleep(0.05)
    assert isinstance(events[-1], End)
    assert events[-1].completion_tokens == 60
    assert count(engine, "two", "stalled") == 0


# --- the whole mesh, real processes ------------------------------------------------------


def stalling_settings(tmp_path: Path) -> Settings:
    """The mesh with small stall bounds, and Envoy's own reapers (idle timeout, TCP user
    timeout) far beyond the test's deadline, so that only the stall bounds can free a slot."""
    settings = mesh_settings(tmp_path)
    settings.inference_local = settings.inference_local.model_copy(
        update={
            "stall_timeout_s": 2.0,
            "models": [settings.inference_local.models[0].model_copy(update={"parallel": 20})],
        }
    )
    settings.gateway = settings.gateway.model_copy(update={"stall_timeout_s": 1.0})
    settings.envoy = settings.envoy.model_copy(
        update={
            "connection_buffer_bytes": 16 << 10,
            "socket_buffer_bytes": 32 << 10,
            "stream_idle_timeout_s": 3600,
            "tcp_keepalive_s": 3600,
        }
    )
    return settings


def stalling_request(port: int, max_tokens: int) -> bytes:
    # Eight choices with 20 alternatives a token stream tens of kilobytes a step, so the output
    # outgrows every buffer on the way in seconds: Envoy's, gRPC's windows, and the kernel's
    # socket buffers, which on loopback grow to megabytes.
    body = json.dumps(
        {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": max_tokens,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
            "n": 8,
            "logit_bias": {"1": -100, "106": -100},
        }
    ).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def open_stream(port: int, max_tokens: int) -> socket.socket:
    """Send a streaming request and read until its first event: it is generating."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(stalling_request(port, max_tokens))
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the first event: {received[:200]!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def finished(mesh: Mesh, reason: str) -> float:
    with urllib.request.urlopen(mesh.inference_metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    return metric_value(text, "slm_engine_requests_total", finish_reason=reason)


def test_stalled_and_trickling_clients_free_their_slots_while_others_complete(
    model_path: object, tmp_path: Path
) -> None:
    mesh = Mesh(stalling_settings(tmp_path), tmp_path / "slm.toml", tmp_path / "mesh.log")
    mesh.start()
    port = mesh.settings.envoy.port
    stop = threading.Event()
    sockets: list[socket.socket] = []
    reader: threading.Thread | None = None
    try:
        before = finished(mesh, "cancelled") + finished(mesh, "stalled")
        # A client that stops reading after the first event, and one that reads a byte a
        # second; either would take hours to read its answer.
        sockets.append(open_stream(port, 1800))
        trickling = open_stream(port, 1800)
        sockets.append(trickling)

        def trickle() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(1.0) and trickling.recv(1):
                    pass

        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        # Meanwhile other streams share the batch and run to their end.
        with httpx.Client(base_url=mesh.base_url, timeout=300) as client:
            for seed in (1, 2):
                body = {
                    "model": DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": "Count to ten."}],
                    "max_tokens": 48,
                    "seed": seed,
                    "logit_bias": {"1": -100, "106": -100},
                }
                answer = client.post("/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["finish_reason"] == "length"
        # Both stalled streams leave the engine (cancelled through the gateway's write
        # timeout, or stopped by the engine's own stall bound), long before they could end.
        assert wait_for(
            lambda: finished(mesh, "cancelled") + finished(mesh, "stalled") >= before + 2,
            timeout_s=240,
        ), mesh.log_tail()
        assert finished(mesh, "length") == 2  # only the two complete ones ran to their end
        # A stream the gateway ends for a stalled client is a warning, not uvicorn's error.
        assert "without completing response" not in (tmp_path / "mesh.log").read_text()
    finally:
        stop.set()
        if reader is not None:
            reader.join()
        for sock in sockets:
            sock.close()
        mesh.stop()
