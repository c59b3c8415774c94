"""The `slm` command: `slm up` runs the whole mesh, `slm serve NAME` runs one service."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from slm import cli_client
from slm.config import Settings, load_settings
from slm.logs import configure_logging

SERVICES = (
    "ledger",
    "inference-local",
    "kv-cache",
    "adapter-registry",
    "inference-remote",
    "doorman",
    "gateway",
    "envoy",
)


async def serve_grpc(name: str, settings: Settings) -> None:
    from slm import telemetry
    from slm.server import GrpcService, ServiceApp, wait_for_signal

    registry = CollectorRegistry()
    telemetry.setup_tracing(name, settings.telemetry)
    app: ServiceApp
    if name == "ledger":
        from ledger.app import build_app as build_ledger

        app, endpoint = build_ledger(settings, registry), settings.ledger.endpoint
    elif name == "inference-local":
        from inference_local.app import build_app as build_inference

        app, endpoint = build_inference(settings, registry), settings.inference_local.endpoint
    elif name == "kv-cache":
        from kvcache.app import build_app as build_kv_cache

        app, endpoint = build_kv_cache(settings, registry), settings.kv_cache.endpoint
    elif name == "adapter-registry":
        from adapters.app import build_app as build_adapters

        app, endpoint = build_adapters(settings, registry), settings.adapters.endpoint
    elif name == "inference-remote":
        from inference_remote.app import build_app as build_remote

        app, endpoint = build_remote(settings, registry), settings.inference_remote.endpoint
    else:
        from doorman.app import build_app as build_doorman

        app, endpoint = build_doorman(settings, registry), settings.doorman.endpoint
    from slm.discovery import registration

    async with (
        GrpcService(name, app, endpoint, settings.telemetry, registry) as service,
        registration(settings.discovery, name, endpoint.host, service.port),
    ):
        await wait_for_signal()


def serve(name: str, settings: Settings) -> int:
    if name == "envoy":
        from gateway.envoy.render import envoy_binary, render_envoy_config

        path = settings.state_dir / "envoy.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_envoy_config(settings))
        binary = envoy_binary(settings)
        # exec: the supervisor's signals reach Envoy itself.
        os.execv(binary, [binary, "-c", str(path), "--log-level", "warn", "--disable-hot-restart"])
    if name == "gateway":
        from gateway.app import run_gateway

        run_gateway(settings)
        return 0
    asyncio.run(serve_grpc(name, settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slm", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (default: $SLM_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the whole mesh and supervise it")
    serve_parser = commands.add_parser("serve", help="run one service in the foreground")
    serve_parser.add_argument("service", choices=SERVICES)
    from ledger.commands import add_arguments as add_ledger_arguments

    add_ledger_arguments(commands.add_parser("ledger", help="verify the ledger or export CSV"))
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
    if args.command == "ledger":
        from ledger.commands import run as run_ledger

        return run_ledger(args, settings.ledger.endpoint.address)
    if args.command == "up":
        from slm.supervisor import run_up

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
