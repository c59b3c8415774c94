"""The REST gateway's configuration section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from gateway.documents import DocumentLimits
from slm.config import (
    LOOPBACK,
    DiscoveryConfig,
    Section,
    TelemetryConfig,
    dial_host,
    replica_port,
)

# The routes that generate (each holds a sequence slot or a place in a queue while it runs):
# they count against gateway.max_concurrent_requests and envoy.max_concurrent_requests.
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


# What a multipart upload adds to its file (boundaries, part headers, the purpose field).
UPLOAD_OVERHEAD_BYTES = 64 << 10


class GatewayConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8000, ge=0, le=65535)
    # Gateway processes `slm up` runs, replica N on port + 100 N; Envoy balances over them
    # (least requests first). Each counts max_concurrent_requests on its own.
    replicas: int = Field(default=1, ge=1, le=64)
    # One address or a comma list: the gateway and Envoy balance over every Doorman it names.
    doorman: str = f"{LOOPBACK}:50051"
    # Limit on JSON bodies the gateway parses, in bytes (Envoy enforces the same).
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Most choices (`n`) one chat or completion request may ask for; above it is a 400.
    max_n: int = Field(default=8, ge=1, le=128)
    # Generation requests (GENERATION_PATHS) in flight; beyond it the gateway answers 429 with
    # Retry-After before it reads the body. Envoy refuses first at its own limit; this one
    # holds for callers that reach the gateway directly. The default is what inference-local
    # holds on its defaults: 32 sequence slots + max_queue 32.
    max_concurrent_requests: int = Field(default=64, ge=1)
    # A response write that the client has not taken for this long ends the request: the
    # Doorman's call is cancelled (the engine frees the slot within a step) and the connection
    # closed. A write blocks only once Envoy's buffer (envoy.connection_buffer_bytes) and the
    # sockets' are full, so this bounds how long a client that stops reading holds a slot.
    stall_timeout_s: float = Field(default=30.0, gt=0)
    # SHA-256 (hex) of the admin key guarding /admin/*. Empty: admin endpoints are open, which
    # is allowed only while the gateway listens on loopback (the embedded default).
    admin_key_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    # Where the admin endpoints reach the services they manage. Every address goes through
    # `[discovery]`, so it may name several instances; the model routes reach each of them.
    inference_local: str = f"{LOOPBACK}:50052"
    ledger: str = f"{LOOPBACK}:50056"
    adapter_registry: str = f"{LOOPBACK}:50055"
    # Files uploaded through /v1/files, each under a generated name; nothing else is written here.
    files_dir: Path = Path("~/.cache/service-slm/files")
    # Most bytes one file may have, uploaded or sent inline in a chat. An upload to /v1/files
    # may be this large (plus UPLOAD_OVERHEAD_BYTES of form), at Envoy too. An inline file
    # travels base64 in the JSON body, 4/3 its size, so it also has to fit max_body_bytes and
    # envoy.max_body_bytes (1 MiB: inline files up to about 750 KiB); upload larger ones.
    max_file_bytes: int = Field(default=10 << 20, ge=1)
    max_pdf_pages: int = Field(default=200, ge=1)
    # Cells read from one workbook, all sheets together (empty cells in a row's range count).
    max_sheet_cells: int = Field(default=200_000, ge=1)
    # Characters of text one file may give; a longer one is refused, never cut.
    max_extracted_chars: int = Field(default=400_000, ge=1)
    # Files one owner (API key) may keep in files_dir; an upload past it is a 400.
    max_files_per_owner: int = Field(default=100, ge=1)

    @field_validator("files_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _replicas_need_a_port(self) -> GatewayConfig:
        if self.replicas > 1 and not self.port:
            raise ValueError("gateway.replicas above 1 needs a port (replica N listens on +100 N)")
        last = replica_port(self.port, self.replicas - 1)
        if last > 65535:
            raise ValueError(
                f"gateway: replica {self.replicas - 1} would listen on port {last}, above 65535"
            )
        return self

    def replica(self, index: int) -> GatewayConfig:
        """The section as replica `index` of `slm up` runs it (0 is this one)."""
        if not 0 <= index < self.replicas:
            raise ValueError(f"gateway replica {index} of {self.replicas}")
        return self.model_copy(update={"port": replica_port(self.port, index)})

    @property
    def addresses(self) -> list[str]:
        """Where Envoy and probes reach every replica (wildcard hosts as loopback)."""
        host = dial_host(self.host)
        return [f"{host}:{replica_port(self.port, k)}" for k in range(self.replicas)]

    def document_limits(self) -> DocumentLimits:
        return DocumentLimits(
            max_file_bytes=self.max_file_bytes,
            max_pdf_pages=self.max_pdf_pages,
            max_sheet_cells=self.max_sheet_cells,
            max_extracted_chars=self.max_extracted_chars,
        )


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway reads of the mesh's settings: its own section, and how it reaches and
    reports on the services behind it."""

    gateway: GatewayConfig
    telemetry: TelemetryConfig
    discovery: DiscoveryConfig
