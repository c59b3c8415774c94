"""Text out of the files a chat carries: PDF, DOCX, XLSX, Markdown and plain text."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
MARKDOWN = "text/markdown"
TEXT = "text/plain"

_BY_MEDIA_TYPE = {
    PDF: PDF,
    DOCX: DOCX,
    XLSX: XLSX,
    MARKDOWN: MARKDOWN,
    "text/x-markdown": MARKDOWN,
    TEXT: TEXT,
}
_BY_EXTENSION = {
    ".pdf": PDF,
    ".docx": DOCX,
    ".xlsx": XLSX,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".txt": TEXT,
}
# Types that say nothing about the content: the file name, then the bytes, decide.
_UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})
SUPPORTED = "PDF, DOCX, XLSX, Markdown or plain text"
# An OOXML file's parts may expand this many times the file's size and no more: a few
# kilobytes of zip can otherwise declare gigabytes of XML (a zip bomb).
_UNZIP_FACTOR = 32
# A parser's own words may quote the file; a client needs only the gist of them.
_REASON_CHARS = 200


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """What one file may be: its bytes, a PDF's pages, a workbook's cells, the text it gives."""

    max_file_bytes: int = 10 << 20
    max_pdf_pages: int = 200
    max_sheet_cells: int = 200_000
    max_extracted_chars: int = 400_000


class DocumentError(Exception):
    """A file that gives no text: corrupt, encrypted, of an unsupported type, or over a limit.

    The message says which and why, in words for the client; it never quotes the file.
    """

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        # Over max_file_bytes: an upload answers 413 for it, as for any body over its limit.
        self.too_large = too_large


def media_type_of(data: bytes, media_type: str | None, filename: str | None) -> str:
    """The type `data` is read as: a declared type this module reads, else the file name's
    extension, else what the bytes start with. Raises DocumentError for any other type."""
    declared = (media_type or "").split(";", 1)[0].strip().lower()
    if declared in _BY_MEDIA_TYPE:
        return _BY_MEDIA_TYPE[declared]
    if declared not in _UNTYPED:
        raise DocumentError(f"files of type {declared!r} are not supported: send {SUPPORTED}")
    extension = PurePosixPath(filename or "").suffix.lower()
    if extension in _BY_EXTENSION:
        return _BY_EXTENSION[extension]
    sniffed = _sniff(data)
    if sniffed is None:
        named = f"{extension!r} files" if extension else "files of unknown type"
        raise DocumentError(f"{named} are not supported: send {SUPPORTED}")
    return sniffed


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"%PDF-"):
        return PDF
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, ValueError):
            return None
        if "word/document.xml" in names:
            return DOCX
        if "xl/workbook.xml" in names:
            return XLSX
        return None
    # Untyped and unnamed, UTF-8 without NULs is text (as file(1) has it); binary is not.
    if b"\0" not in data:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return TEXT
    return None


def extract_text(
    data: bytes, media_type: str | None, filename: str | None, limits: DocumentLimits
) -> str:
    """The text of one file, read by its type (see media_type_of). Blocking and CPU-bound:
    call it in a thread. Raises DocumentError, whose message says what is wrong and why."""
    if len(data) > limits.max_file_bytes:
        raise DocumentError(
            f"the file has {len(data)} bytes; at most {limits.max_file_bytes} are accepted",
            too_large=True,
        )
    kind = media_type_of(data, media_type, filename)
    if kind in (MARKDOWN, TEXT):
        return _limited(_decoded(data), limits)
    reader, name = _READERS[kind]
    if kind != PDF:
        _check_unzipped_size(data, name, limits)
    text = _Text(limits)
    try:
        reader(data, limits, text)
    except DocumentError:
        raise
    except Exception as error:  # parsers raise anything on a corrupt file
        reason = f"{type(error).__name__}: {error}"[:_REASON_CHARS]
        raise DocumentError(f"the file is not a readable {name} ({reason})") from None
    return text.value()


def _decoded(data: bytes) -> str:
    try:
        # utf-8-sig: a byte-order mark that editors on Windows write is no part of the text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentError(
            f"a text file must be UTF-8; byte {error.start} is not valid UTF-8"
        ) from None


def _limited(text: str, limits: DocumentLimits) -> str:
    if len(text) > limits.max_extracted_chars:
        raise _too_much_text(limits)
    return text


def _too_much_text(limits: DocumentLimits) -> DocumentError:
    # Refused, not cut: a model that saw part of a file would answer about the whole of it.
    return DocumentError(
        f"the file's text is longer than {limits.max_extracted_chars} characters, the most a "
        "file may give"
    )


class _Text:
    """The text read so far, refused as soon as it grows past the limit (not at the end, so a
    huge file costs no more than the limit)."""

    def __init__(self, limits: DocumentLimits) -> None:
        self._limits = limits
        self._parts: list[str] = []
        self._chars = 0

    def add(self, part: str) -> None:
        self._chars += len(part) + 1
        if self._chars > self._limits.max_extracted_chars + 1:
            raise _too_much_text(self._limits)
        self._parts.append(part)

    def value(self) -> str:
        return "\n".join(self._parts)


def _check_unzipped_size(data: bytes, name: str, limits: DocumentLimits) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError) as error:
        raise DocumentError(
            f"the file is not a readable {name} (not a zip archive: {error})"
        ) from None
    # zipfile stops reading a part at its declared size, so the declared sum bounds the work.
    bound = limits.max_file_bytes * _UNZIP_FACTOR
    if declared > bound:
        raise DocumentError(
            f"the {name} file unpacks to {declared} bytes; at most {bound} are accepted"
        )


def _read_pdf(data: bytes, limits: DocumentLimits, text: _Text) -> None:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        raise DocumentError("the PDF is encrypted: send it without a password")
    pages = len(reader.pages)
    if pages > limits.max_pdf_pages:
        raise DocumentError(
            f"the PDF has {pages} pages; at most {limits.max_pdf_pages} are accepted"
        )
    for page in reader.pages:
        text.add(page.extract_text())


def _read_docx(data: bytes, limits: DocumentLimits, text: _Text) -> None:
    import docx
    from docx.table import Table

    document = docx.Document(io.BytesIO(data))
    # Paragraphs and tables in the order they stand in the body.
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                text.add("\t".join(cell.text for cell in row.cells))
        else:
            text.add(block.text)


def _read_xlsx(data: bytes, limits: DocumentLimits, text: _Text) -> None:
    # openpyxl ships no type hints.
    from openpyxl import load_workbook  # type: ignore[import-untyped]

    # read_only streams rows; data_only gives the values Excel computed, not the formulas.
    workbook = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        cells = 0
        for sheet in workbook.worksheets:
            text.add(f"[sheet {sheet.title}]")
            for row in sheet.iter_rows(values_only=True):
                cells += len(row)
                if cells > limits.max_sheet_cells:
                    raise DocumentError(
                        f"the workbook has more than {limits.max_sheet_cells} cells, the most "
                        "a file may have"
                    )
                line = _row_text(row)
                if line:
                    text.add(line)
    finally:
        workbook.close()


def _row_text(row: Iterable[object]) -> str:
    values = ["" if value is None else str(value) for value in row]
    while values and not values[-1]:
        values.pop()
    return "\t".join(values)


_READERS: dict[str, tuple[Callable[[bytes, DocumentLimits, _Text], None], str]] = {
    PDF: (_read_pdf, "PDF"),
    DOCX: (_read_docx, "DOCX"),
    XLSX: (_read_xlsx, "XLSX"),
}
