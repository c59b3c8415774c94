"""The `slm` commands that talk to a running mesh over its REST API: chat, models, adapters."""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
from tqdm import tqdm

from inference_local.config import InferenceLocalConfig, ModelConfig
from mesh.settings import Settings
from slm import errors

T = TypeVar("T")

ADMIN_KEY_ENV = "SLM_ADMIN_KEY"
API_KEY_ENV = "SLM_API_KEY"
CLIENT_COMMANDS = ("chat", "adapters")
MODEL_ACTIONS = ("list", "load", "unload", "apply")
# How often a progress bar redraws while it waits on work it cannot measure.
_TICK_S = 0.2

_ERRORS_BY_STATUS: Mapping[int, type[errors.SlmError]] = {
    400: errors.InvalidArgument,
    401: errors.Unauthenticated,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.FailedPrecondition,
    413: errors.InvalidArgument,
    429: errors.ResourceExhausted,
    503: errors.Unavailable,
    504: errors.DeadlineExceeded,
}
_TIERS = {"local": "A (local)", "gpu": "B (GPU)", "external": "C (external)"}


def error_for(response: httpx.Response) -> errors.SlmError:
    """The SlmError for an HTTP error reply in OpenAI's shape (or any other body)."""
    message = f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or message)
    elif isinstance(body, dict) and isinstance(body.get("detail"), str):
        message = body["detail"]
    if response.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
        message = f"this mesh has no {response.request.method} {response.request.url.path}"
    kind = _ERRORS_BY_STATUS.get(response.status_code, errors.Internal)
    return kind(f"{message} (HTTP {response.status_code})")


def items(body: Any, *names: str) -> list[dict[str, Any]]:
    """The list inside a reply, whatever the endpoint calls it."""
    if isinstance(body, list):
        return [i for i in body if isinstance(i, dict)]
    if isinstance(body, dict):
        for name in (*names, "data", "items"):
            value = body.get(name)
            if isinstance(value, list):
                return [i for i in value if isinstance(i, dict)]
    return []


@dataclass(frozen=True, slots=True)
class Answer:
    """One streamed chat answer and its figures."""

    text: str
    finish_reason: str | None
    ttft_s: float | None
    duration_s: float
    completion_tokens: int | None
    tier: str | None
    masked_entities: dict[str, int] = field(default_factory=dict)
    stopped: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        if self.completion_tokens is None or self.ttft_s is None:
            return None
        decode_s = self.duration_s - self.ttft_s
        after_first = self.completion_tokens - 1
        return after_first / decode_s if decode_s > 0 and after_first > 0 else None

    def figures(self) -> str:
        parts = []
        if self.tier:
            parts.append(f"tier {_TIERS.get(self.tier, self.tier)}")
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s * 1000:.0f} ms")
        rate = self.tokens_per_s
        if rate is not None:
            parts.append(f"{rate:.1f} tokens/s")
        if self.completion_tokens is not None:
            parts.append(f"{self.completion_tokens} tokens")
        parts.append("stopped" if self.stopped else f"finish {self.finish_reason}")
        if self.masked_entities:
            masked = ", ".join(f"{k} x{v}" for k, v in sorted(self.masked_entities.items()))
            parts.append(f"personal data masked upstream and restored: {masked}")
        return " · ".join(parts)


class MeshClient:
    """The mesh's REST API (through Envoy) as Python calls; raises SlmError subclasses."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)
        self._api_key = api_key
        self._admin_key = admin_key

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def _headers(self, key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"} if key else {}

    def _call(self, method: str, path: str, *, admin: bool, body: Any = None) -> Any:
        headers = self._headers(self._admin_key if admin else self._api_key)
        try:
            response = self._http.request(method, path, json=body, headers=headers)
        except httpx.TransportError as error:
            raise errors.Unavailable(f"cannot reach {self._http.base_url}: {error}") from error
        if response.is_error:
            raise error_for(response)
        return response.json() if response.content else None

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The models a client may use (/v1/models)."""
        return items(self._call("GET", "/v1/models", admin=False))

    def admin_models(self) -> list[dict[str, Any]]:
        """Every model the mesh knows, loaded or not (/admin/models)."""
        return items(self._call("GET", "/admin/models", admin=True), "models")

    def load_model(self, name: str, path: str | None = None) -> Any:
        body: dict[str, Any] = {"name": name}
        if path:
            body["path"] = path
        return self._call("POST", "/admin/models/load", admin=True, body=body)

    def unload_model(self, name: str) -> Any:
        return self._call("POST", "/admin/models/unload", admin=True, body={"name": name})

    def apply_manifest(self, body: Mapping[str, Any]) -> Any:
        return self._call("PUT", "/admin/manifest", admin=True, body=body)

    # -- adapters -------------------------------------------------------------------------------

    def adapters(self) -> list[dict[str, Any]]:
        return items(self._call("GET", "/admin/adapters", admin=True), "adapters")

    def register_adapter(self, spec: Mapping[str, Any]) -> Any:
        return self._call("POST", "/admin/adapters", admin=True, body=dict(spec))

    def delete_adapter(self, name: str) -> Any:
        return self._call("DELETE", f"/admin/adapters/{name}", admin=True)

    # -- chat -----------------------------------------------------------------------------------

    def chat_chunks(self, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON chunks of a streamed chat; closing the iterator cancels the generation."""
        request = {**body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self._http.stream(
                "POST", "/v1/chat/completions", json=request, headers=self._headers(self._api_key)
            ) as response:
                if response.is_error:
                    response.read()
                    raise error_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk.get("error"), dict):
                        raise errors.Internal(str(chunk["error"].get("message")))
                    yield chunk
        except httpx.TransportError as error:
            raise errors.Unavailable(f"cannot reach {self._http.base_url}: {error}") from error

    def chat(self, body: Mapping[str, Any], out: IO[str]) -> Answer:
        """Stream one answer to `out` as it arrives; Ctrl-C stops it (and the generation)."""
        started = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] | None = None
        extension: dict[str, Any] = {}
        stopped = False
        chunks = self.chat_chunks(body)
        try:
            for chunk in chunks:
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if ttft is None:
                            ttft = time.perf_counter() - started
                        parts.append(text)
                        out.write(text)
                        out.flush()
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage") or usage
                extension = chunk.get("slm") or extension
        except KeyboardInterrupt:
            stopped = True
        finally:
            chunks.close()  # type: ignore[attr-defined]
        return Answer(
            text="".join(parts),
            finish_reason=finish,
            ttft_s=ttft,
            duration_s=time.perf_counter() - started,
            completion_tokens=usage.get("completion_tokens") if usage else None,
            tier=extension.get("tier"),
            masked_entities=dict(extension.get("masked_entities") or {}),
            stopped=stopped,
        )


# -- progress ---------------------------------------------------------------------------------


def with_spinner(description: str, work: Callable[[], T], stream: IO[str]) -> T:
    """Run `work` on a thread while a bar shows the time it has taken so far."""
    bar = tqdm(desc=description, total=None, bar_format="{desc}: {elapsed}", file=stream)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, bar:
        future = pool.submit(work)
        while not concurrent.futures.wait([future], timeout=_TICK_S).done:
            bar.refresh()
        bar.set_description_str(f"{description}: done")
        return future.result()


def assemble_with_progress(settings: Settings, stream: IO[str]) -> list[tuple[str, Path]]:
    """Assemble every configured model file that is missing, with a bar per file.

    The bar follows the size of the file being written against the size of the package's
    chunks, so assembly itself needs no progress hook.
    """
    from inference_local.models import ensure_model_file

    dirs = [settings.inference_local.models_dir]
    done: list[tuple[str, Path]] = []
    for entry in settings.inference_local.models:
        target = Path(entry.path).expanduser()
        if not target.is_absolute():
            target = dirs[0] / target
        if target.is_file() or entry.package is None:
            done.append(
                (entry.name, ensure_model_file(dirs, entry.path, entry.package, entry.name))
            )
            continue
        total = _package_size(entry)
        partial = target.with_suffix(target.suffix + ".partial")
        bar = tqdm(
            desc=f"assembling {entry.name}",
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=stream,
        )
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, bar:
            future = pool.submit(ensure_model_file, dirs, entry.path, entry.package, entry.name)
            while not concurrent.futures.wait([future], timeout=_TICK_S).done:
                bar.update(max(_size(partial) - bar.n, 0))
            path = future.result()
            bar.update(max((total or _size(path)) - bar.n, 0))
            done.append((entry.name, path))
    return done


def _package_size(entry: ModelConfig) -> int | None:
    """Bytes the assembled file will have: the sum of its package's chunks, when it says."""
    try:
        package = importlib.import_module(entry.package or "")
        return sum(Path(p).stat().st_size for p in package.chunk_paths())
    except (ImportError, AttributeError, OSError):
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- the commands -----------------------------------------------------------------------------


def add_arguments(commands: Any, models: argparse.ArgumentParser) -> None:
    """Add `slm chat`, `slm adapters ...` and the arguments of `slm models
    list|load|unload|apply`."""
    models.add_argument("name", nargs="?", help="model name (load, unload)")
    models.add_argument("--path", help="load: GGUF file, inside the models directory")
    models.add_argument(
        "--dry-run",
        action="store_true",
        help="apply: report what the config file's manifest would change, change nothing",
    )
    _connection_arguments(models)

    chat = commands.add_parser("chat", help="chat with a model, streaming (Ctrl-C stops)")
    chat.add_argument("--model", help="model name (default: the first the mesh lists)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--seed", type=int)
    _connection_arguments(chat)

    adapters = commands.add_parser("adapters", help="LoRA adapters in the adapter registry")
    adapter_actions = adapters.add_subparsers(dest="action", required=True)
    _connection_arguments(adapter_actions.add_parser("list", help="list registered adapters"))
    register = adapter_actions.add_parser("register", help="register an adapter artefact")
    register.add_argument("name")
    register.add_argument("--base-model", required=True)
    register.add_argument("--source", required=True, help="path or URI of the artefact")
    register.add_argument("--format", choices=["gguf", "peft"], default="gguf")
    register.add_argument("--sha256", help="expected checksum of the artefact")
    register.add_argument("--scale", type=float, help="default LoRA scale")
    _connection_arguments(register)
    delete = adapter_actions.add_parser("delete", help="delete an adapter")
    delete.add_argument("name")
    _connection_arguments(delete)


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the mesh's REST API (default: Envoy from the config)")
    parser.add_argument(
        "--admin-key", default=os.environ.get(ADMIN_KEY_ENV), help=f"or ${ADMIN_KEY_ENV}"
    )
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"or ${API_KEY_ENV}")


def handles(args: argparse.Namespace) -> bool:
    """Whether this module runs the parsed command."""
    command: str = args.command
    return command in CLIENT_COMMANDS or (
        command == "models" and getattr(args, "action", None) in MODEL_ACTIONS
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run a client command; errors print one line and exit 1."""
    url = args.url or f"http://{settings.envoy.host}:{settings.envoy.port}"
    try:
        with MeshClient(url, api_key=args.api_key, admin_key=args.admin_key) as client:
            if args.command == "chat":
                return chat_loop(client, args, sys.stdin, sys.stdout, sys.stderr)
            if args.command == "models" and args.action == "apply":
                return apply_command(client, settings, args.dry_run, sys.stdout, sys.stderr)
            if args.command == "models":
                return models_command(client, args, sys.stdout, sys.stderr)
            return adapters_command(client, args, sys.stdout)
    except errors.SlmError as error:
        print(f"slm: {error.message}", file=sys.stderr)
        return 1


def assemble_command(settings: Settings) -> int:
    """`slm models assemble`: build missing model files from their packages, with progress."""
    try:
        for name, path in assemble_with_progress(settings, sys.stderr):
            print(f"{name}: {path}")
    except errors.SlmError as error:
        print(f"slm: {error.message}", file=sys.stderr)
        return 1
    return 0


def models_command(client: MeshClient, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    if args.action == "list":
        try:
            rows = client.admin_models()
        except (errors.NotFound, errors.Unauthenticated, errors.PermissionDenied) as error:
            # Without the admin listing, the models a client may use are still worth showing.
            print(f"slm: {error.message}; showing /v1/models", file=err)
            rows = client.models()
        print_table(rows, out, prefer=("name", "id", "loaded", "owned_by", "context_length"))
        return 0
    if not args.name:
        raise errors.InvalidArgument(f"slm models {args.action} needs a model name")
    if args.action == "load":
        reply = with_spinner(
            f"loading {args.name}", lambda: client.load_model(args.name, args.path), err
        )
    else:
        reply = client.unload_model(args.name)
    print(f"{args.action}ed {args.name}" if reply is None else json.dumps(reply), file=out)
    return 0


def manifest_body(config: InferenceLocalConfig, dry_run: bool) -> dict[str, Any]:
    """PUT /admin/manifest's body from the config file's inference_local section: its models
    (each must name a tier: the manifest says where every model is kept) and tier budgets."""
    untiered = [m.name for m in config.models if m.tier is None]
    if untiered:
        raise errors.InvalidArgument(
            f"slm models apply: {', '.join(map(repr, untiered))} has no tier in the config "
            "file (resident, standby, remote or on_demand)"
        )
    body: dict[str, Any] = {
        "models": [
            m.model_dump(mode="json", exclude_none=True, exclude={"preload", "pinned"})
            for m in config.models
        ],
        "dry_run": dry_run,
    }
    if config.resident_budget_mb is not None:
        body["resident_budget_mb"] = config.resident_budget_mb
    if config.standby_budget_mb is not None:
        body["standby_budget_mb"] = config.standby_budget_mb
    return body


def apply_command(
    client: MeshClient, settings: Settings, dry_run: bool, out: IO[str], err: IO[str]
) -> int:
    """`slm models apply`: the config file's model manifest onto every inference-local replica
    of the running mesh, with a drain (or, with --dry-run, what it would change)."""
    body = manifest_body(settings.inference_local, dry_run)
    verb = "checking" if dry_run else "applying"
    reply = with_spinner(f"{verb} the manifest", lambda: client.apply_manifest(body), err)
    for replica in reply.get("replicas", []):
        changes = ", ".join(
            f"{what} {' '.join(replica[what])}"
            for what in ("added", "removed", "changed", "kept")
            if replica.get(what)
        )
        print(f"{replica['address']}: {changes or 'nothing'}", file=out)
    print_table(items(reply), out, prefer=("id", "tier", "state", "memory_bytes", "co_activation"))
    return 0


def adapters_command(client: MeshClient, args: argparse.Namespace, out: IO[str]) -> int:
    if args.action == "list":
        print_table(client.adapters(), out, prefer=("name", "base_model", "format", "sha256"))
        return 0
    if args.action == "register":
        spec: dict[str, Any] = {
            "name": args.name,
            "base_model": args.base_model,
            "source": args.source,
            "format": args.format,
        }
        if args.sha256:
            spec["sha256"] = args.sha256
        if args.scale is not None:
            spec["default_scale"] = args.scale
        reply = client.register_adapter(spec)
    else:
        reply = client.delete_adapter(args.name)
    print(f"{args.action}ed {args.name}" if reply is None else json.dumps(reply), file=out)
    return 0


def print_table(rows: Sequence[Mapping[str, Any]], out: IO[str], prefer: Sequence[str]) -> None:
    """Rows as aligned columns: the preferred ones first, when present."""
    if not rows:
        print("(none)", file=out)
        return
    seen = [k for row in rows for k in row]
    columns = [c for c in prefer if c in seen][:6] or list(dict.fromkeys(seen))[:6]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    header = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
    print(header.rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else json.dumps(value)


def chat_loop(
    client: MeshClient, args: argparse.Namespace, inp: IO[str], out: IO[str], err: IO[str]
) -> int:
    """Read user messages line by line, stream each answer; `/reset` forgets, `/exit` leaves."""
    model = args.model
    if not model:
        available = client.models()
        if not available:
            raise errors.FailedPrecondition("the mesh serves no models")
        model = str(available[0].get("id"))
    interactive = inp.isatty()
    if interactive:
        print(
            f"chatting with {model}; Ctrl-C stops an answer, /reset forgets, /exit leaves", file=err
        )
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    system = list(history)
    while True:
        line = _read(inp, "you> " if interactive else None, err)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(system)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        body: dict[str, Any] = {"model": model, "messages": history}
        for name, value in (
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("max_tokens", args.max_tokens),
            ("seed", args.seed),
        ):
            if value is not None:
                body[name] = value
        answer = client.chat(body, out)
        out.write("\n")
        out.flush()
        print(f"[{answer.figures()}]", file=err)
        history.append({"role": "assistant", "content": answer.text})


def _read(inp: IO[str], prompt: str | None, err: IO[str]) -> str | None:
    if prompt is not None:
        try:
            return input(prompt)
        except EOFError:
            return None
        except KeyboardInterrupt:
            print(file=err)
            return None
    line = inp.readline()
    return line or None
