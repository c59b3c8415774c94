"""Files for chats: /v1/files (upload, list, get, delete), stored per owner, and the file parts
of chat requests read as text (inline base64 or an uploaded file's id).

The owner of a file is the SHA-256 of the API key that uploaded it (never the key); another key
neither sees, lists, deletes nor references it, and is told 404, so ids do not leak. With
authentication off in the Doorman, every caller is one owner. File contents never reach a log:
only ids, sizes and types are logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import grpc
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from gateway import errors
from gateway.channels import current
from gateway.config import UPLOAD_OVERHEAD_BYTES, GatewayConfig
from gateway.documents import DocumentError, DocumentLimits, extract_text, media_type_of
from gateway.protocol import ErrorResponse, FileTexts
from gateway.serving import CallContext
from slm.v1 import doorman_pb2

log = logging.getLogger(__name__)

FILES = "/v1/files"
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
# What an uploaded file is for: both mean "to be referenced in a chat" here. Batch and
# fine-tuning files would be accepted and never used, so they are refused.
PURPOSES = ("user_data", "assistants")
# The owner of every file while the Doorman takes any caller (authentication off).
ANONYMOUS = "anonymous"
_MAX_FILENAME = 255
_AUTH_CHECK_TIMEOUT_S = 10
# A body that may hold a file part; one without these bytes has none (a JSON string can hide
# "file" only behind a \u escape), and skips the thread and the file machinery.
_FILE_MARKERS = (b"file", b"document", b"\\u")

Parsed = TypeVar("Parsed")


@dataclass(frozen=True, slots=True)
class StoredFile:
    """An uploaded file's record; its bytes lie beside it."""

    id: str
    owner: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    media_type: str

    def wire(self) -> dict[str, Any]:
        """OpenAI's File object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class FileStore:
    """Files in one directory, each as `<id>.data` and its record `<id>.json`. Ids are
    generated and checked against FILE_ID before any path is built, so no client string ever
    names a path. Blocking: call it in a thread."""

    def __init__(self, root: Path, max_per_owner: int) -> None:
        self.root = root
        self.max_per_owner = max_per_owner

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        if not FILE_ID.match(file_id):
            raise KeyError(file_id)
        return self.root / f"{file_id}.json", self.root / f"{file_id}.data"

    def create(
        self, owner: str, data: bytes, filename: str, purpose: str, media_type: str
    ) -> StoredFile:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if len(self.list(owner)) >= self.max_per_owner:
            raise DocumentError(
                f"this API key keeps {self.max_per_owner} files already, the most it may; "
                "delete some first"
            )
        stored = StoredFile(
            id=f"file-{secrets.token_hex(12)}",
            owner=owner,
            bytes=len(data),
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
            media_type=media_type,
        )
        record, content = self._paths(stored.id)
        _write_atomically(content, data)
        # The record last: a file exists once its record does.
        _write_atomically(record, json.dumps(asdict(stored)).encode())
        return stored

    def get(self, owner: str, file_id: str) -> StoredFile | None:
        try:
            record, _ = self._paths(file_id)
            stored = StoredFile(**json.loads(record.read_bytes()))
        except (KeyError, OSError, ValueError, TypeError):
            return None
        return stored if stored.owner == owner else None

    def read(self, owner: str, file_id: str) -> tuple[StoredFile, bytes] | None:
        stored = self.get(owner, file_id)
        if stored is None:
            return None
        try:
            return stored, self._paths(file_id)[1].read_bytes()
        except OSError:
            return None

    def list(self, owner: str) -> list[StoredFile]:
        found = []
        for record in self.root.glob("file-*.json"):
            stored = self.get(owner, record.stem)
            if stored is not None:
                found.append(stored)
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, owner: str, file_id: str) -> bool:
        if self.get(owner, file_id) is None:
            return False
        record, content = self._paths(file_id)
        record.unlink(missing_ok=True)
        content.unlink(missing_ok=True)
        return True


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    temporary.replace(path)


def owner_of_key(authorization: str | None) -> str:
    """The owner id for a caller the Doorman authenticated: SHA-256 of its key."""
    _, _, key = (authorization or "").partition(" ")
    return hashlib.sha256(key.strip().encode()).hexdigest()


def _clean_filename(filename: str | None) -> str:
    # It is shown to the model in "[file NAME]": one line, of bounded length.
    return " ".join((filename or "").split())[:_MAX_FILENAME]


class Attachments(FileTexts):
    """The file parts of one request, read as text: inline data decoded, an uploaded file read
    from the store if the caller owns it. Runs in a worker thread (protocol.parse_* call it
    during validation); the owner is found once, on the event loop, when first needed."""

    def __init__(
        self,
        store: FileStore,
        limits: DocumentLimits,
        owner: Callable[[], Coroutine[Any, Any, str]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._store = store
        self._limits = limits
        self._owner = owner
        self._loop = loop
        self._owner_id: str | None = None

    def owner(self) -> str:
        if self._owner_id is None:
            future = asyncio.run_coroutine_threadsafe(self._owner(), self._loop)
            self._owner_id = future.result()
        return self._owner_id

    def text_of(self, file: object) -> str:
        if not isinstance(file, dict):
            raise DocumentError("'file' must be an object with file_data or file_id")
        for name in sorted(set(file) - {"file_data", "file_id", "filename"}):
            raise DocumentError(f"a file part does not take {name!r}")
        for name, value in file.items():
            if not isinstance(value, str):
                raise DocumentError(f"{name} must be a string")
        data, file_id = file.get("file_data"), file.get("file_id")
        if (data is None) == (file_id is None):
            raise DocumentError("a file part gives exactly one of file_data and file_id")
        filename = _clean_filename(file.get("filename"))
        if data is not None:
            media_type, content = self._decoded(data)
        else:
            assert file_id is not None
            found = self._store.read(self.owner(), file_id)
            if found is None:
                raise DocumentError(f"no file {file_id!r} was uploaded with this API key")
            stored, content = found
            media_type, filename = stored.media_type, filename or stored.filename
        text = extract_text(content, media_type, filename, self._limits)
        return f"[file {filename}]\n{text}" if filename else f"[file]\n{text}"

    def _decoded(self, data: str) -> tuple[str | None, bytes]:
        media_type: str | None = None
        payload = data
        if data.startswith("data:"):
            header, comma, payload = data[5:].partition(",")
            if not comma or not header.endswith(";base64"):
                raise DocumentError("file_data must be base64: 'data:<media type>;base64,<data>'")
            media_type = header.split(";", 1)[0] or None
        # Base64 takes 4 characters for 3 bytes: refuse before decoding what cannot fit.
        if len(payload) // 4 * 3 > self._limits.max_file_bytes + 3:
            raise DocumentError(
                f"the file has more than {self._limits.max_file_bytes} bytes, the most accepted"
            )
        try:
            return media_type, base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise DocumentError("file_data is not valid base64") from None


class Documents:
    """The file machinery of one app: its store, its limits, its routes, and the parsing of
    request bodies that may carry files."""

    def __init__(
        self, config: GatewayConfig, context: Callable[[Request, str], CallContext]
    ) -> None:
        self.store = FileStore(config.files_dir, config.max_files_per_owner)
        self.limits = config.document_limits()
        self._context = context

    async def owner(self, request: Request, route: str) -> str:
        """Whose files the caller may use: ANONYMOUS while the Doorman authenticates no one,
        else the owner of its key, once the Doorman has accepted that key. Raises Refusal with
        the Doorman's answer (401, 403, 503) otherwise."""
        ctx = self._context(request, route)
        doorman = current(request).doorman
        anonymous = tuple((k, v) for k, v in ctx.metadata if k != "authorization")
        try:
            await doorman.ListModels(
                doorman_pb2.DoormanServiceListModelsRequest(),
                metadata=anonymous,
                timeout=_AUTH_CHECK_TIMEOUT_S,
            )
            return ANONYMOUS
        except grpc.aio.AioRpcError as error:
            if error.code() not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise errors.Refusal(errors.from_grpc(error)) from None
        try:
            await doorman.ListModels(
                doorman_pb2.DoormanServiceListModelsRequest(),
                metadata=ctx.metadata,
                timeout=_AUTH_CHECK_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            raise errors.Refusal(errors.from_grpc(error)) from None
        return owner_of_key(dict(ctx.metadata).get("authorization"))

    async def parse(
        self,
        request: Request,
        route: str,
        body: bytes,
        parse: Callable[[bytes, FileTexts | None], Parsed],
    ) -> Parsed:
        """`parse(body, files)`, with the file parts read, in a worker thread when the body
        may hold any: parsers are slow on big files, and the event loop keeps serving."""
        if not any(marker in body for marker in _FILE_MARKERS):
            return parse(body, None)
        attachments = Attachments(
            self.store,
            self.limits,
            lambda: self.owner(request, route),
            asyncio.get_running_loop(),
        )
        return await asyncio.to_thread(parse, body, attachments)


# Response shapes, for the OpenAPI document: the routes build plain dicts.


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "PDF, DOCX, XLSX, Markdown or plain text.",
                        },
                        "purpose": {"type": "string", "enum": list(PURPOSES)},
                    },
                    "required": ["file", "purpose"],
                    "additionalProperties": False,
                    "examples": [{"file": "# Notes\n\nShip on Friday.", "purpose": "user_data"}],
                }
            }
        },
    }
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _not_found(file_id: str) -> Response:
    # The same answer for a file that never was and one of another key: ids do not leak.
    return errors.for_status(404, f"No such File object: {file_id!r}.").response()


async def _form(request: Request, body: bytes) -> FormData:
    """The multipart form of `body` (already read within its limit), or Refusal with a 400."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise errors.Refusal(
            errors.invalid_request(
                "an upload is multipart/form-data with 'file' and 'purpose'", None
            )
        )
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=2)
    # python-multipart's own errors are ValueErrors.
    except (HTTPException, MultiPartException, ValueError, KeyError) as error:
        detail = error.detail if isinstance(error, HTTPException) else str(error)
        raise errors.Refusal(
            errors.invalid_request(f"the multipart body is not valid: {detail}", None)
        ) from None


def files_router(
    documents: Documents, read_body: Callable[[Request, int], Awaitable[bytes]]
) -> APIRouter:
    """OpenAI's Files API, for files that chats reference by id."""
    router = APIRouter()
    store = documents.store
    limits = documents.limits

    # The stateful phase of a fuzzer (and a reader) learns from these links that the id an
    # upload returns is what GET and DELETE /v1/files/{file_id} take.
    by_id = {"file_id": "$response.body#/id"}
    links = {
        "RetrieveFile": {"operationId": "retrieve_file", "parameters": by_id},
        "DeleteFile": {"operationId": "delete_file", "parameters": by_id},
    }

    @router.post(
        FILES,
        operation_id="upload_file",
        responses={
            200: {"model": FileObject, "links": links},
            **_errors(400, 401, 403, 413, 500, 503),
        },
        openapi_extra=_UPLOAD_DOC,
    )
    async def upload(request: Request) -> Response:
        """Upload a file (multipart: `file`, `purpose`) for chats to reference by its id."""
        owner = await documents.owner(request, FILES)
        form = await _form(
            request, await read_body(request, limits.max_file_bytes + UPLOAD_OVERHEAD_BYTES)
        )
        for name in sorted(set(form.keys()) - {"file", "purpose"}):
            return errors.invalid_request(
                f"Unrecognized request argument supplied: {name}", name
            ).response()
        purpose = form.get("purpose")
        if purpose is None:
            return errors.invalid_request(
                "Missing required parameter: 'purpose'.", "purpose"
            ).response()
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            return errors.invalid_request(
                f"purpose must be one of {', '.join(PURPOSES)}", "purpose"
            ).response()
        upload = form.get("file")
        if upload is None:
            return errors.invalid_request("Missing required parameter: 'file'.", "file").response()
        if isinstance(upload, UploadFile):
            data = await upload.read()
            filename, media_type = upload.filename, upload.content_type
        else:
            data, filename, media_type = upload.encode(), None, None
        try:
            # Read now, so that a file no chat could use is refused at once, saying why.
            kind = media_type_of(data, media_type, filename)
            await asyncio.to_thread(extract_text, data, kind, filename, limits)
            stored = await asyncio.to_thread(
                store.create, owner, data, _clean_filename(filename) or "upload", purpose, kind
            )
        except DocumentError as error:
            if error.too_large:
                return errors.for_status(413, error.message, "request_too_large").response()
            return errors.invalid_request(error.message, "file").response()
        # Never the name or the contents: either may be personal data.
        log.info(
            "file uploaded",
            extra={"file_id": stored.id, "bytes": stored.bytes, "media_type": stored.media_type},
        )
        return JSONResponse(stored.wire())

    @router.get(
        FILES,
        operation_id="list_files",
        responses={200: {"model": FileList}, **_errors(400, 401, 403, 500, 503)},
    )
    async def list_files(
        request: Request,
        purpose: Annotated[Literal["user_data", "assistants"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
        after: Annotated[str | None, Query()] = None,
    ) -> Response:
        """The caller's files, newest first unless `order` is asc."""
        owner = await documents.owner(request, FILES)
        files = await asyncio.to_thread(store.list, owner)
        if order == "asc":
            files.reverse()
        if purpose is not None:
            files = [f for f in files if f.purpose == purpose]
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        page = files[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [f.wire() for f in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(files) > len(page),
            }
        )

    @router.get(
        f"{FILES}/{{file_id}}",
        operation_id="retrieve_file",
        responses={200: {"model": FileObject}, **_errors(401, 403, 404, 500, 503)},
    )
    async def get_file(request: Request, file_id: str) -> Response:
        """One of the caller's files."""
        owner = await documents.owner(request, FILES)
        stored = await asyncio.to_thread(store.get, owner, file_id)
        return JSONResponse(stored.wire()) if stored is not None else _not_found(file_id)

    @router.delete(
        f"{FILES}/{{file_id}}",
        operation_id="delete_file",
        responses={200: {"model": FileDeleted}, **_errors(401, 403, 404, 500, 503)},
    )
    async def delete_file(request: Request, file_id: str) -> Response:
        """Delete one of the caller's files."""
        owner = await documents.owner(request, FILES)
        if not await asyncio.to_thread(store.delete, owner, file_id):
            return _not_found(file_id)
        log.info("file deleted", extra={"file_id": file_id})
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    return router
