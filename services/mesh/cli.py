"""The `slm` command: `slm up` runs the whole mesh, `slm serve NAME` runs one service."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from mesh import client as cli_client
from mesh.services import BY_NAME, SERVICES, Service, replica_index
from mesh.settings import Settings, load_settings
from slm.logs import configure_logging
from slm.server import run_process

log = logging.getLogger(__name__)


async def serve_grpc(service: Service, settings: Settings, replica: int = 0) -> None:
    from slm import telemetry
    from slm.discovery import registration
    from slm.runtime import Runtime
    from slm.server import GrpcService, wait_for_signal

    telemetry.setup_tracing(service.name, settings.telemetry)
    runtime = Runtime.create(settings.telemetry, settings.discovery, CollectorRegistry())
    endpoint = service.endpoint(settings).replica(replica)
    try:
        app = service.build(settings, runtime, replica)
        async with (
            GrpcService(
                service.name, app, endpoint, settings.telemetry, runtime.registry
            ) as server,
            registration(settings.discovery, service.name, endpoint.host, server.port),
        ):
            await wait_for_signal(Reloader(service, app).hangup if service.reloads else None)
    finally:
        await runtime.close()


class Reloader:
    """On SIGHUP, reads the config file again and hands the service its section (one reload at
    a time: a SIGHUP during one is logged and dropped; the next one reads the file anew)."""

    def __init__(self, service: Service, app: Any) -> None:
        self._service = service
        self._app = app
        self._task: asyncio.Task[None] | None = None

    def hangup(self) -> None:
        if self._task is not None and not self._task.done():
            log.warning("SIGHUP: a reload is in progress; send it again once it has finished")
            return
        self._task = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            settings = load_settings()
        except (OSError, ValueError) as error:
            # pydantic's ValidationError is a ValueError: a broken file changes nothing.
            log.error(
                "SIGHUP: the config file cannot be read; nothing changed",
                extra={"error": str(error)[:2000]},
            )
            return
        await self._app.reload(self._service.config(settings))


def write_envoy_config(settings: Settings, out: Path | None) -> int:
    """The bootstrap `slm serve envoy` runs, for an Envoy started elsewhere (the chart renders
    it in an init container, so the cluster's edge is this one, not a copy of it)."""
    from gateway.envoy.render import render_envoy_config

    try:
        rendered = render_envoy_config(settings.gateway, settings.envoy)
    except ValueError as error:
        print(f"slm: bad configuration: {error}", file=sys.stderr)
        return 2
    if out is None:
        sys.stdout.write(rendered)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rendered)
    return 0


def serve(name: str, settings: Settings) -> int:
    service = BY_NAME[name]
    if service.kind == "envoy":
        from gateway.envoy.render import envoy_binary, render_envoy_config

        path = settings.state_dir / "envoy.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_envoy_config(settings.gateway, settings.envoy))
        binary = envoy_binary(settings.envoy)
        # exec: the supervisor's signals reach Envoy itself.
        os.execv(binary, [binary, "-c", str(path), "--log-level", "warn", "--disable-hot-restart"])
    replica = replica_index()
    if not 0 <= replica < service.replicas(settings):
        print(f"slm: {name} has no replica {replica}", file=sys.stderr)
        return 2
    if service.kind == "http":
        from gateway.app import run_gateway
        from gateway.config import GatewaySettings

        section = service.replica_section(settings.gateway, replica)
        run_gateway(GatewaySettings(section, settings.telemetry, settings.discovery))
        return 0
    run_process(serve_grpc(service, settings, replica))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slm", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (default: $SLM_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the whole mesh and supervise it")
    serve_parser = commands.add_parser("serve", help="run one service in the foreground")
    serve_parser.add_argument("service", choices=[s.name for s in SERVICES])
    from ledger.commands import add_arguments as add_ledger_arguments

    add_ledger_arguments(commands.add_parser("ledger", help="verify the ledger or export CSV"))
    envoy = commands.add_parser(
        "envoy-config", help="write Envoy's bootstrap rendered from the settings"
    )
    envoy.add_argument("--out", type=Path, help="file to write (default: standard output)")
    models = commands.add_parser("models", help="model files")
    models.add_argument("action", choices=["assemble", *cli_client.MODEL_ACTIONS])
    cli_client.add_arguments(commands, models)
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.config)
    except (FileNotFoundError, ValueError) as error:
        print(f"slm: bad configuration: {error}", file=sys.stderr)
        return 2
    if cli_client.handles(args):
        return cli_client.run(args, settings)
    if args.command == "envoy-config":
        return write_envoy_config(settings, args.out)
    if args.command == "ledger":
        from ledger.commands import run as run_ledger

        return run_ledger(args, settings.ledger.endpoint.address)
    if args.command == "up":
        from mesh.supervisor import run_up

        configure_logging("slm-up", settings.telemetry.log_level)
        return asyncio.run(run_up(settings, args.config))
    if args.command == "serve":
        configure_logging(args.service, settings.telemetry.log_level)
        # A crash in native code (llama.cpp, CUDA, grpc) then leaves every thread's Python stack
        # on stderr, which `slm up` writes to its log, instead of a bare exit code -11.
        faulthandler.enable()
        return serve(args.service, settings)
    return cli_client.assemble_command(settings)


if __name__ == "__main__":
    sys.exit(main())
