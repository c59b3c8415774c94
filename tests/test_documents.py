"""Document ingest: text out of real PDF, DOCX, XLSX and Markdown files, and every refusal."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import zipfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import docx
import grpc
import httpx
import openai
import pytest
from helpers import DEFAULT_MODEL, Mesh, mesh_settings
from openpyxl import Workbook  # type: ignore[import-untyped]

from doorman.auth import hash_api_key
from doorman.config import PrivacyConfig, TenantConfig
from gateway.anthropic.protocol import parse_messages
from gateway.documents import (
    DOCX,
    PDF,
    TEXT,
    XLSX,
    DocumentError,
    DocumentLimits,
    extract_text,
    media_type_of,
)
from gateway.files import ANONYMOUS, FILE_ID, Attachments, FileStore
from gateway.protocol import RequestInvalid, parse_chat
from gateway.responses.protocol import parse_responses
from slm.v1 import ledger_pb2, ledger_pb2_grpc

LIMITS = DocumentLimits()


def make_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page, written by hand: no installed
    package writes text PDFs. Offsets in the xref table are the real ones."""
    page_ids = [3 + 2 * i for i in range(len(pages))]
    font_id = 3 + 2 * len(pages)
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids ["
        + b" ".join(b"%d 0 R" % p for p in page_ids)
        + b"] /Count %d >>" % len(pages),
        font_id: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for page_id, line in zip(page_ids, pages, strict=True):
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = b"BT /F1 12 Tf 72 720 Td (" + escaped.encode("latin-1") + b") Tj ET"
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>" % (font_id, page_id + 1)
        )
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    count = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % count
    for number in range(1, count):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (count, xref)
    return bytes(out)


def make_docx(paragraphs: list[str], table: list[list[str]] | None = None) -> bytes:
    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_xlsx(sheets: dict[str, list[list[object]]]) -> bytes:
    workbook = Workbook()
    workbook.remove(workbook.active)
    for title, rows in sheets.items():
        sheet = workbook.create_sheet(title)
        for row in rows:
            sheet.append(row)
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def refusal(data: bytes, media_type: str | None, filename: str | None, **limits: int) -> str:
    with pytest.raises(DocumentError) as caught:
        extract_text(data, media_type, filename, DocumentLimits(**limits))
    return caught.value.message


def test_pdf_gives_the_text_of_every_page() -> None:
    data = make_pdf(["Quarterly report", "Revenue grew (a lot)"])
    text = extract_text(data, "application/pdf", "report.pdf", LIMITS)
    assert "Quarterly report" in text
    assert "Revenue grew (a lot)" in text
    assert text.index("Quarterly") < text.index("Revenue")


def test_docx_gives_paragraphs_and_tables_in_order() -> None:
    data = make_docx(["Dear team,", "Write to jane.doe@example.com."], [["name", "role"]])
    text = extract_text(data, DOCX, "letter.docx", LIMITS)
    assert text.splitlines() == ["Dear team,", "Write to jane.doe@example.com.", "name\trole"]


def test_xlsx_gives_each_sheet_as_tab_separated_rows() -> None:
    data = make_xlsx(
        {"Budget": [["item", "cost"], ["rent", 1200], [None, None]], "Notes": [["ok"]]}
    )
    text = extract_text(data, XLSX, "budget.xlsx", LIMITS)
    assert text.splitlines() == [
        "[sheet Budget]",
        "item\tcost",
        "rent\t1200",
        "[sheet Notes]",
        "ok",
    ]


def test_markdown_is_its_own_text() -> None:
    data = "# Plan\n\n- ship *it*\n- café\n".encode()
    assert (
        extract_text(data, "text/markdown", "plan.md", LIMITS) == "# Plan\n\n- ship *it*\n- café\n"
    )
    # A byte-order mark is no part of the text.
    assert extract_text(b"\xef\xbb\xbfhi", None, "a.md", LIMITS) == "hi"


def test_the_type_comes_from_the_media_type_then_the_name_then_the_bytes() -> None:
    pdf = make_pdf(["x"])
    assert media_type_of(pdf, "application/pdf; charset=binary", None) == PDF
    assert media_type_of(pdf, "application/octet-stream", "x.PDF") == PDF
    assert media_type_of(pdf, None, None) == PDF
    assert media_type_of(make_docx(["x"]), None, "upload.bin") == DOCX
    assert media_type_of(make_xlsx({"a": [["x"]]}), None, None) == XLSX
    assert extract_text(make_docx(["sniffed"]), None, None, LIMITS) == "sniffed"


def test_unsupported_types_are_refused_naming_them() -> None:
    assert "'image/png'" in refusal(b"\x89PNG", "image/png", "x.png")
    assert "'.doc'" in refusal(b"\xd0\xcf\x11\xe0", None, "old.doc")
    assert "unknown type" in refusal(b"\x00\x01\xff binary", None, None)
    # Untyped, unnamed UTF-8 is text.
    assert extract_text("just text, café".encode(), None, None, LIMITS) == "just text, café"
    # A zip that is neither a document nor a workbook.
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("hello.txt", "hi")
    assert "not supported" in refusal(archive.getvalue(), None, "x.zip")


def test_corrupt_files_are_refused_saying_so() -> None:
    pdf = make_pdf(["Quarterly report"])
    assert "not a readable PDF" in refusal(pdf[: len(pdf) // 3], PDF, "x.pdf")
    assert "not a readable PDF" in refusal(b"%PDF-1.4\ngarbage", PDF, "x.pdf")
    docx_bytes = make_docx(["x"])
    assert "not a readable DOCX" in refusal(docx_bytes[:200], DOCX, "x.docx")
    assert "not a readable DOCX" in refusal(b"not a zip", DOCX, "x.docx")
    assert "not a readable XLSX" in refusal(make_docx(["x"]), XLSX, "x.xlsx")


def test_a_text_file_must_be_utf8() -> None:
    assert "UTF-8" in refusal("naïve".encode("latin-1"), "text/markdown", "x.md")


def test_an_encrypted_pdf_is_refused() -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(make_pdf(["secret"]))))
    writer.encrypt("pw", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    assert "encrypted" in refusal(out.getvalue(), PDF, "x.pdf")


def test_limits_are_enforced_and_named() -> None:
    message = refusal(b"12345", "text/plain", "a.txt", max_file_bytes=4)
    assert "5 bytes" in message
    assert "at most 4" in message
    pdf = make_pdf(["one", "two", "three"])
    assert "3 pages" in refusal(pdf, PDF, "x.pdf", max_pdf_pages=2)
    assert extract_text(pdf, PDF, "x.pdf", DocumentLimits(max_pdf_pages=3))
    assert "longer than 10 characters" in refusal(
        b"x" * 11, "text/plain", None, max_extracted_chars=10
    )
    big = make_docx(["a" * 30] * 5)
    assert "longer than 100" in refusal(big, DOCX, None, max_extracted_chars=100)
    sheet = make_xlsx({"s": [[1, 2, 3]] * 10})
    assert "more than 20 cells" in refusal(sheet, XLSX, None, max_sheet_cells=20)


def test_a_zip_bomb_is_refused_before_it_is_unpacked() -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", b"\0" * (2 << 20))
    data = archive.getvalue()
    message = refusal(data, DOCX, "bomb.docx", max_file_bytes=len(data) + 1)
    assert "unpacks to" in message


def test_an_error_never_quotes_the_file() -> None:
    secret = b"jane.doe@example.com"
    for media_type in (PDF, DOCX, XLSX):
        assert "jane.doe" not in refusal(b"%PDF-1.4\n" + secret, media_type, None)


# --- file parts of a chat, parsed ----------------------------------------------------------------


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def chat_body(*parts: dict[str, Any]) -> bytes:
    content = [{"type": "text", "text": "Summarise."}, *parts]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


def no_owner() -> Coroutine[Any, Any, str]:
    raise AssertionError("an inline file needs no owner")


def test_a_file_part_becomes_a_text_part_naming_the_file(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    loop.close()  # an inline file asks for no owner: nothing runs on the loop

    def attachments(store: FileStore, owner: Callable[[], Coroutine[Any, Any, str]]) -> Attachments:
        return Attachments(store, LIMITS, owner, loop)

    file = {"file_data": data_url(make_docx(["Hello"]), DOCX), "filename": "a\nletter.docx"}
    part = {"type": "file", "file": file}
    body = parse_chat(chat_body(part), files=attachments(FileStore(tmp_path, 10), no_owner))
    assert body.messages[0].content == "Summarise.\n[file a letter.docx]\nHello"
    # Bare base64 without a data URL: the type comes from the name.
    bare = {"file_data": base64.b64encode(b"# Notes").decode(), "filename": "n.md"}
    files = attachments(FileStore(tmp_path, 10), no_owner)
    parsed = parse_chat(chat_body({"type": "file", "file": bare}), files=files)
    assert parsed.messages[0].content.endswith("[file n.md]\n# Notes")


@pytest.mark.parametrize(
    ("file", "words"),
    [
        ({"file_data": data_url(b"%PDF-1.4 junk", PDF), "filename": "x.pdf"}, "readable PDF"),
        ({"file_data": "data:text/markdown;base64,@@@"}, "not valid base64"),
        ({"file_data": "data:image/png;base64,AAAA"}, "'image/png' are not supported"),
        ({"file_data": "AAAA", "file_id": "file-1"}, "exactly one of"),
        ({"filename": "x.md"}, "exactly one of"),
        ({"file_data": "AAAA", "detail": "high"}, "does not take 'detail'"),
        ({"file_id": "file-" + "0" * 24}, "no file"),
    ],
)
def test_a_bad_file_part_is_a_400_naming_the_part(
    tmp_path: Path, file: dict[str, str], words: str
) -> None:
    async def anonymous() -> str:
        return ANONYMOUS

    async def run() -> None:
        loop = asyncio.get_running_loop()
        files = Attachments(FileStore(tmp_path, 10), LIMITS, anonymous, loop)
        with pytest.raises(RequestInvalid) as caught:
            await asyncio.to_thread(parse_chat, chat_body({"type": "file", "file": file}), 8, files)
        assert caught.value.param == "messages[0].content[1].file"
        assert words in caught.value.message

    asyncio.run(run())


def test_without_a_file_reader_file_parts_are_refused() -> None:
    part = {"type": "file", "file": {"file_data": "AAAA"}}
    with pytest.raises(RequestInvalid) as caught:
        parse_chat(chat_body(part))
    assert caught.value.param == "messages[0].content[1].type"


def test_an_uploaded_file_is_read_by_its_owner_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path, 10)
    stored = store.create("alice", b"# Plan\nship it", "plan.md", "user_data", "text/markdown")
    assert FILE_ID.match(stored.id)
    assert store.get("bob", stored.id) is None
    assert store.list("bob") == []
    assert not store.delete("bob", stored.id)
    assert [f.id for f in store.list("alice")] == [stored.id]
    # A client string never becomes a path.
    assert store.get("alice", "../" + stored.id) is None

    async def run(owner: str) -> str:
        async def resolve() -> str:
            return owner

        files = Attachments(store, LIMITS, resolve, asyncio.get_running_loop())
        part = {"type": "file", "file": {"file_id": stored.id}}
        body = await asyncio.to_thread(parse_chat, chat_body(part), 8, files)
        return body.messages[0].content

    assert asyncio.run(run("alice")).endswith("[file plan.md]\n# Plan\nship it")
    with pytest.raises(RequestInvalid, match="no file"):
        asyncio.run(run("bob"))
    assert store.delete("alice", stored.id)
    assert store.list("alice") == []


def test_an_owner_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path, 2)
    for _ in range(2):
        store.create("alice", b"x", "x.md", "user_data", "text/markdown")
    with pytest.raises(DocumentError, match="2 files already"):
        store.create("alice", b"x", "x.md", "user_data", "text/markdown")
    store.create("bob", b"x", "x.md", "user_data", "text/markdown")


# --- the whole mesh through Envoy, authentication on, the local tier sanitised --------------------

KEY_A = "sk-docs-alice-5f1e"
KEY_B = "sk-docs-bob-93c0"
EMAIL = "jane.doe@example.com"
SECRET_PHRASE = "Project Bluewhistle budget"
MAX_FILE_BYTES = 64 << 10


@pytest.fixture(scope="module")
def docs_mesh(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("documents-mesh")
    settings = mesh_settings(state)
    settings.doorman = settings.doorman.model_copy(
        update={
            "auth_required": True,
            "tenants": [
                TenantConfig(name="alice", key_hashes=[hash_api_key(KEY_A)]),
                TenantConfig(name="bob", key_hashes=[hash_api_key(KEY_B)]),
            ],
            "privacy": PrivacyConfig(sanitize_tiers=["local"]),
        }
    )
    # Below Envoy's body limit, so that the gateway's own answer to a big file is what shows.
    settings.gateway.max_file_bytes = MAX_FILE_BYTES
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    yield mesh
    assert mesh.stop() == 0, mesh.log_tail()


def client_for(mesh: Mesh, key: str) -> openai.OpenAI:
    return mesh.openai_client(key)


def ask(client: openai.OpenAI, part: dict[str, Any]) -> Any:
    messages: Any = [
        {"role": "user", "content": [{"type": "text", "text": "Who wrote this?"}, part]}
    ]
    return client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=8, temperature=0
    )


async def ledger_text(mesh: Mesh) -> tuple[str, ledger_pb2.ListResponse]:
    async with grpc.aio.insecure_channel(mesh.settings.doorman.ledger) as channel:
        records = await ledger_pb2_grpc.LedgerServiceStub(channel).List(
            ledger_pb2.ListRequest(page_size=1000), timeout=30
        )
    return str(records), records


@pytest.mark.e2e
async def test_a_docx_in_a_chat_is_masked_like_any_text(docs_mesh: Mesh) -> None:
    document = make_docx([SECRET_PHRASE, f"Write to {EMAIL} by Friday."])
    encoded = data_url(document, DOCX)
    part = {"type": "file", "file": {"file_data": encoded, "filename": "b.docx"}}
    with client_for(docs_mesh, KEY_A) as client:
        reply = ask(client, part)
    assert reply.choices[0].finish_reason in ("stop", "length")
    # The Doorman masked the address it found in the file's text before the engine saw it.
    assert (reply.model_extra or {})["slm"]["masked_entities"]["EMAIL_ADDRESS"] >= 1
    ledger, records = await ledger_text(docs_mesh)
    assert dict(records.records[-1].entry.entity_counts)["EMAIL_ADDRESS"] >= 1
    log = docs_mesh.log_path.read_text(errors="replace")
    for secret in (EMAIL, "jane.doe", SECRET_PHRASE, encoded[40:80]):
        assert secret not in ledger
        assert secret not in log


@pytest.mark.e2e
def test_a_corrupt_file_is_a_400_that_says_why(docs_mesh: Mesh) -> None:
    part = {"type": "file", "file": {"file_data": data_url(b"%PDF-1.7 broken", PDF)}}
    with client_for(docs_mesh, KEY_A) as client, pytest.raises(openai.BadRequestError) as caught:
        ask(client, part)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "messages[0].content[1].file"
    assert "not a readable PDF" in error["message"]
    # The server is still healthy after the refusal.
    assert httpx.get(f"{docs_mesh.base_url}/readyz", timeout=30).status_code == 200


@pytest.mark.e2e
def test_an_uploaded_file_serves_its_owner_and_no_one_else(docs_mesh: Mesh) -> None:
    notes = f"# Notes\n\n{SECRET_PHRASE}: ask {EMAIL}.\n".encode()
    with client_for(docs_mesh, KEY_A) as alice, client_for(docs_mesh, KEY_B) as bob:
        uploaded = alice.files.create(
            file=("notes.md", notes, "text/markdown"), purpose="user_data"
        )
        assert uploaded.id.startswith("file-")
        assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
            len(notes),
            "notes.md",
            "user_data",
        )
        assert alice.files.retrieve(uploaded.id).id == uploaded.id
        assert uploaded.id in [f.id for f in alice.files.list()]

        reference = {"type": "file", "file": {"file_id": uploaded.id}}
        reply = ask(alice, reference)
        assert (reply.model_extra or {})["slm"]["masked_entities"]["EMAIL_ADDRESS"] >= 1

        # Another key cannot see, list, use or delete it; it is told "not found".
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(uploaded.id)
        assert uploaded.id not in [f.id for f in bob.files.list()]
        with pytest.raises(openai.BadRequestError, match="no file"):
            ask(bob, reference)
        with pytest.raises(openai.NotFoundError):
            bob.files.delete(uploaded.id)

        assert alice.files.delete(uploaded.id).deleted
        with pytest.raises(openai.NotFoundError):
            alice.files.retrieve(uploaded.id)
    log = docs_mesh.log_path.read_text(errors="replace")
    assert SECRET_PHRASE not in log
    assert EMAIL not in log


@pytest.mark.e2e
def test_files_refuse_a_missing_or_wrong_key_and_bad_uploads(docs_mesh: Mesh) -> None:
    url = f"{docs_mesh.base_url}/v1/files"
    files = {"file": ("a.md", b"# hi", "text/markdown")}
    assert httpx.post(url, files=files, data={"purpose": "user_data"}).status_code == 401
    wrong = {"authorization": "Bearer sk-nobody"}
    assert httpx.get(url, headers=wrong).status_code == 401
    key = {"authorization": f"Bearer {KEY_A}"}
    bad_purpose = httpx.post(url, headers=key, files=files, data={"purpose": "fine-tune"})
    assert (bad_purpose.status_code, bad_purpose.json()["error"]["param"]) == (400, "purpose")
    image = {"file": ("a.png", b"\x89PNG\r\n", "image/png")}
    unsupported = httpx.post(url, headers=key, files=image, data={"purpose": "user_data"})
    assert unsupported.status_code == 400
    assert "'image/png'" in unsupported.json()["error"]["message"]
    not_multipart = httpx.post(url, headers=key, json={"purpose": "user_data"})
    assert not_multipart.status_code == 400
    big = {"file": ("big.md", b"x" * (MAX_FILE_BYTES + 1), "text/markdown")}
    too_large = httpx.post(url, headers=key, files=big, data={"purpose": "user_data"})
    assert (too_large.status_code, too_large.json()["error"]["code"]) == (413, "request_too_large")
    part = {"type": "file", "file": {"file_data": data_url(b"x" * (MAX_FILE_BYTES + 1), TEXT)}}
    with client_for(docs_mesh, KEY_A) as client, pytest.raises(openai.BadRequestError) as caught:
        ask(client, part)
    assert f"at most {MAX_FILE_BYTES}" in str(caught.value)


# --- Responses input_file and Anthropic document blocks ------------------------------------------


def test_a_responses_input_file_becomes_input_text(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    loop.close()  # inline files ask for no owner
    files = Attachments(FileStore(tmp_path, 10), LIMITS, no_owner, loop)
    part = {"type": "input_file", "file_data": data_url(b"# Plan", "text/markdown")}
    part["filename"] = "plan.md"
    item = {"role": "user", "content": [{"type": "input_text", "text": "Read:"}, part]}
    body = json.dumps({"model": "m", "input": [item]}).encode()
    parsed = parse_responses(body, files)
    assert parsed.input[0].text == "Read:\n[file plan.md]\n# Plan"
    broken = {"type": "input_file", "file_url": "https://example.com/x.pdf"}
    item["content"] = [broken]
    with pytest.raises(RequestInvalid) as caught:
        parse_responses(json.dumps({"model": "m", "input": [item]}).encode(), files)
    assert caught.value.param == "input[0].content[0]"
    assert "'file_url'" in caught.value.message
    with pytest.raises(RequestInvalid, match="not accepted here"):
        parse_responses(body)


def test_an_anthropic_document_becomes_a_text_block(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    loop.close()  # inline files ask for no owner
    files = Attachments(FileStore(tmp_path, 10), LIMITS, no_owner, loop)
    pdf = base64.b64encode(make_pdf(["Quarterly report"])).decode()
    document = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": pdf},
        "title": "q3.pdf",
        "context": "From finance.",
    }
    plain = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "hi"},
    }
    message = {"role": "user", "content": [document, plain, {"type": "text", "text": "Sum up."}]}
    body = {"model": "m", "max_tokens": 4, "messages": [message]}
    parsed = parse_messages(json.dumps(body).encode(), files)
    texts = [block.text for block in parsed.messages[0].content]
    assert texts[0] is not None
    assert texts[0].startswith("From finance.\n[file q3.pdf]\nQuarterly report")
    assert texts[1:] == ["[file]\nhi", "Sum up."]
    document["citations"] = {"enabled": 0}
    with pytest.raises(RequestInvalid, match="citations are not supported"):
        parse_messages(json.dumps(body).encode(), files)
    del document["citations"]
    document["source"] = {"type": "url", "url": "https://example.com/x.pdf"}
    with pytest.raises(RequestInvalid) as caught:
        parse_messages(json.dumps(body).encode(), files)
    assert caught.value.param == "messages[0].content[0].source"
    assert "url and content sources are not supported" in caught.value.message


@pytest.mark.e2e
async def test_responses_and_messages_read_files_through_the_mesh(docs_mesh: Mesh) -> None:
    docx_data = make_docx([f"Contact {EMAIL}."])
    headers = {"authorization": f"Bearer {KEY_A}"}
    async with httpx.AsyncClient(base_url=docs_mesh.base_url, timeout=120) as http:
        part = {"type": "input_file", "file_data": data_url(docx_data, DOCX), "filename": "c.docx"}
        response = await http.post(
            "/v1/responses",
            headers=headers,
            json={
                "model": DEFAULT_MODEL,
                "input": [{"role": "user", "content": [part]}],
                "max_output_tokens": 4,
            },
        )
        assert response.status_code == 200, response.text
        _, records = await ledger_text(docs_mesh)
        assert dict(records.records[-1].entry.entity_counts)["EMAIL_ADDRESS"] >= 1
        source = {
            "type": "base64",
            "media_type": DOCX,
            "data": base64.b64encode(docx_data).decode(),
        }
        message = await http.post(
            "/v1/messages",
            headers={"x-api-key": KEY_A},
            json={
                "model": DEFAULT_MODEL,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "document", "source": source}]}],
            },
        )
        assert message.status_code == 200, message.text
        ledger, records = await ledger_text(docs_mesh)
        assert dict(records.records[-1].entry.entity_counts)["EMAIL_ADDRESS"] >= 1
    assert EMAIL not in ledger
    assert EMAIL not in docs_mesh.log_path.read_text(errors="replace")


# --- uploads larger than the JSON body limit, through Envoy --------------------------------------


def docx_with_noise_image(text: str, side: int) -> bytes:
    """A DOCX holding `text` and a side x side picture of random noise (which no compression
    shrinks): a file of megabytes whose text is one line."""
    from PIL import Image

    picture = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(picture, "PNG")
    picture.seek(0)
    document = docx.Document()
    document.add_paragraph(text)
    document.add_picture(picture)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


@pytest.mark.e2e
def test_an_upload_larger_than_the_body_limit_passes_envoy(mesh: Mesh) -> None:
    data = docx_with_noise_image("The report was written by the harbour office.", 900)
    # Larger than any JSON request may be, within the file limit.
    assert mesh.settings.envoy.max_body_bytes < len(data) < mesh.settings.gateway.max_file_bytes
    with mesh.openai_client("none") as client:
        uploaded = client.files.create(file=("report.docx", data, DOCX), purpose="user_data")
        assert uploaded.bytes == len(data)
        reply = ask(client, {"type": "file", "file": {"file_id": uploaded.id}})
        assert reply.choices[0].message.content
        assert client.files.delete(uploaded.id).deleted
