"""Helpers shared by the tests: free ports, a config for one test mesh, servers on port 0."""

from __future__ import annotations

import socket
from pathlib import Path

from slm.config import (
    DoormanConfig,
    EnvoyConfig,
    GatewayConfig,
    InferenceLocalConfig,
    LedgerConfig,
    ServiceEndpoint,
    Settings,
)

DEFAULT_MODEL = "gemma-3-270m"
SHARED_MODELS_DIR = Path("~/.cache/service-slm/models").expanduser()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mesh_settings(state_dir: Path) -> Settings:
    """Settings for a whole mesh on fresh loopback ports, with its own state directory."""
    ports = {name: free_port() for name in ("doorman", "inference", "ledger", "gateway", "envoy")}
    metrics = {name: free_port() for name in ("doorman", "inference", "ledger")}
    inference = InferenceLocalConfig(
        endpoint=ServiceEndpoint(port=ports["inference"], metrics_port=metrics["inference"]),
        models_dir=SHARED_MODELS_DIR,
    )
    return Settings(
        state_dir=state_dir,
        inference_local=inference,
        ledger=LedgerConfig(
            endpoint=ServiceEndpoint(port=ports["ledger"], metrics_port=metrics["ledger"]),
            database=state_dir / "ledger.sqlite3",
        ),
        doorman=DoormanConfig(
            endpoint=ServiceEndpoint(port=ports["doorman"], metrics_port=metrics["doorman"]),
            inference_local=f"127.0.0.1:{ports['inference']}",
            ledger=f"127.0.0.1:{ports['ledger']}",
        ),
        gateway=GatewayConfig(port=ports["gateway"], doorman=f"127.0.0.1:{ports['doorman']}"),
        envoy=EnvoyConfig(port=ports["envoy"], admin_port=free_port()),
    )


def to_toml(settings: Settings) -> str:
    """Serialise settings as the TOML file `slm --config` reads."""
    lines: list[str] = []

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if v is None:
            raise ValueError("None cannot be written to TOML")
        text = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{text}"'

    def table(prefix: str, data: dict[str, object]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict | list) and v is not None}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in data.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(v, list):
                for item in v:
                    lines.append(f"[[{prefix}.{k}]]" if prefix else f"[[{k}]]")
                    lines.extend(
                        f"{ik} = {value(iv)}" for ik, iv in item.items() if iv is not None
                    )

    table("", settings.model_dump(mode="json"))
    return "\n".join(lines) + "\n"
