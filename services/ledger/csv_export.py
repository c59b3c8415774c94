"""CSV rendering of ledger records, for auditors and spreadsheets."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from ledger.store import Record
from slm.v1 import types_pb2

COLUMNS = (
    "sequence",
    "request_id",
    "time",
    "tenant",
    "key_id",
    "operation",
    "model",
    "adapter",
    "tier",
    "upstream",
    "hops",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "latency_ms",
    "finish_reason",
    "status_code",
    "entity_counts",
    "policy_decisions",
    "tools_offered",
    "tool_calls",
    "constraint",
    "cache_hit",
    "prev_hash",
    "hash",
)

# A cell starting with one of these is a formula to a spreadsheet; model names and request ids
# come from clients, so they are quoted to stay text (OWASP's advice on CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: str) -> str:
    return f"'{value}" if value.startswith(_FORMULA_START) else value


def _enum_name(name_of: Callable[[Any], str], value: int) -> str:
    try:
        return name_of(value)
    except ValueError:
        return str(value)


def _time(unix_ns: int) -> str:
    stamp = datetime.fromtimestamp(unix_ns // 1_000_000_000, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{unix_ns % 1_000_000_000:09d}Z"


def csv_row(record: Record) -> list[str]:
    e = record.entry
    hops = [
        {"model": h.model, "tier": _enum_name(types_pb2.Tier.Name, h.tier), "upstream": h.upstream}
        | ({"intent": h.intent} if h.intent else {})
        for h in e.hops
    ]
    return [
        str(record.sequence),
        _text(e.request_id),
        _time(e.time_unix_ns),
        _text(e.tenant),
        _text(e.key_id),
        _text(e.operation),
        _text(e.model),
        _text(e.adapter),
        _enum_name(types_pb2.Tier.Name, e.tier),
        _text(e.upstream),
        _text(json.dumps(hops, separators=(",", ":"))) if hops else "",
        str(e.prompt_tokens),
        str(e.completion_tokens),
        f"{e.ttft_ms:.3f}",
        f"{e.latency_ms:.3f}",
        _enum_name(types_pb2.FinishReason.Name, e.finish_reason),
        str(e.status_code),
        json.dumps(e.entity_counts, sort_keys=True, separators=(",", ":"))
        if e.entity_counts
        else "",
        _text(";".join(e.policy_decisions)),
        _text(";".join(e.tools_offered)),
        _text(";".join(e.tool_calls)),
        _text(e.constraint),
        "true" if e.cache_hit else "false",
        record.prev_hash,
        record.hash,
    ]


def render(rows: Iterable[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerows(rows)
    return out.getvalue()


async def csv_chunks(batches: AsyncIterator[Sequence[Record]]) -> AsyncIterator[str]:
    """The header, then one chunk per batch of records; each chunk ends on a line boundary."""
    yield render([list(COLUMNS)])
    async for batch in batches:
        yield render(csv_row(record) for record in batch)
