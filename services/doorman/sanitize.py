"""Masks personal data with stable per-request placeholders, found by presidio's recognizers.

Only presidio's regex/checksum recognizers run: no spaCy model is loaded (none can be downloaded
here, and NER would cost far more than the mesh's latency budget).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from slm.errors import Internal
from slm.v1 import inference_pb2, types_pb2

# Placeholders look like <EMAIL_ADDRESS_1>: the closing ">" makes the set prefix-free, which the
# streaming rehydrator relies on, and small models copy this shape faithfully.
PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z0-9_]*_\d+>")


@dataclass(frozen=True, slots=True)
class Finding:
    entity: str
    start: int
    end: int
    score: float


class Detector(Protocol):
    def detect(self, text: str) -> list[Finding]:
        """Non-overlapping findings in `text`; raises when detection itself fails."""


class DetectionFailed(Internal):
    """Personal-data detection failed, so nothing was sent upstream."""

    reason = "SANITIZE_FAILED"


def _offline_email_recognizer() -> Any:
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    # presidio's own check calls tldextract.extract, which fetches the public suffix list over
    # the network on first use; the snapshot bundled with tldextract needs no network.
    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(extract(pattern_text).fqdn)

    return OfflineEmailRecognizer()


def _recognizer_factories() -> dict[str, Callable[[], Any]]:
    from presidio_analyzer import predefined_recognizers as pr

    return {
        "EMAIL_ADDRESS": _offline_email_recognizer,
        "PHONE_NUMBER": pr.PhoneRecognizer,
        "CREDIT_CARD": pr.CreditCardRecognizer,
        "IBAN_CODE": pr.IbanRecognizer,
        "IP_ADDRESS": pr.IpRecognizer,
        "URL": pr.UrlRecognizer,
        "US_SSN": pr.UsSsnRecognizer,
        "CRYPTO": pr.CryptoRecognizer,
        "MAC_ADDRESS": pr.MacAddressRecognizer,
        "UK_NHS": pr.NhsRecognizer,
    }


class PresidioDetector:
    """presidio-analyzer's pattern recognizers, custom patterns and deny terms, no NLP engine."""

    def __init__(
        self,
        entities: Iterable[str],
        custom_patterns: Mapping[str, str] | None = None,
        deny_terms: Iterable[str] = (),
        min_score: float = 0.3,
    ) -> None:
        from presidio_analyzer import Pattern, PatternRecognizer

        factories = _recognizer_factories()
        unknown = sorted(set(entities) - factories.keys())
        if unknown:
            raise ValueError(
                f"unknown entity types {unknown}; known: {sorted(factories)} "
                "(add others as doorman.privacy.custom_patterns)"
            )
        self._recognizers: list[Any] = [factories[name]() for name in entities]
        for name, regex in (custom_patterns or {}).items():
            re.compile(regex)  # a bad pattern is a config error now, not a failed request later
            self._recognizers.append(
                PatternRecognizer(supported_entity=name, patterns=[Pattern(name, regex, 1.0)])
            )
        terms = [term for term in deny_terms if term]
        if terms:
            self._recognizers.append(
                PatternRecognizer(supported_entity="DENY_TERM", deny_list=terms)
            )
        self._min_score = min_score

    def detect(self, text: str) -> list[Finding]:
        found = [
            Finding(result.entity_type, result.start, result.end, result.score)
            for recognizer in self._recognizers
            for result in recognizer.analyze(text, recognizer.supported_entities, None)
            if result.score >= self._min_score and result.end > result.start
        ]
        return _without_overlaps(found)


def _without_overlaps(found: list[Finding]) -> list[Finding]:
    """The most confident, then longest, of overlapping findings (an e-mail beats the URL in it)."""
    kept: list[Finding] = []
    for finding in sorted(found, key=lambda f: (-f.score, f.start - f.end, f.start)):
        if all(finding.end <= k.start or finding.start >= k.end for k in kept):
            kept.append(finding)
    return sorted(kept, key=lambda f: f.start)


class Masking:
    """One request's placeholders; lives only in the Doorman's memory for that request."""

    def __init__(self, reserved: str = "") -> None:
        self.placeholders: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self._by_value: dict[tuple[str, str], str] = {}
        self._next: Counter[str] = Counter()
        # Placeholder-shaped text the client itself wrote must never be mistaken for ours.
        self._reserved = set(PLACEHOLDER_RE.findall(reserved)) if "<" in reserved else set()

    def placeholder(self, entity: str, value: str) -> str:
        key = (entity, value)
        existing = self._by_value.get(key)
        if existing is not None:
            return existing
        while True:
            self._next[entity] += 1
            candidate = f"<{entity}_{self._next[entity]}>"
            if candidate not in self._reserved:
                break
        self._by_value[key] = candidate
        self.placeholders[candidate] = value
        self.counts[entity] += 1
        return candidate


def _map_strings(data: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(data, str):
        return fn(data)
    if isinstance(data, list):
        return [_map_strings(item, fn) for item in data]
    if isinstance(data, dict):
        return {fn(key): _map_strings(value, fn) for key, value in data.items()}
    return data


class Sanitiser:
    """Replaces personal data with placeholders; any detection failure fails the request closed."""

    def __init__(self, detector: Detector) -> None:
        self._detector = detector

    def mask(self, masking: Masking, text: str) -> str:
        if not text:
            return text
        try:
            findings = self._detector.detect(text)
        except Exception as error:
            raise DetectionFailed(
                "personal-data detection failed, so the request was not sent upstream",
                metadata={"error": type(error).__name__},
            ) from error
        if not findings:
            return text
        parts: list[str] = []
        position = 0
        for finding in findings:
            parts.append(text[position : finding.start])
            parts.append(masking.placeholder(finding.entity, text[finding.start : finding.end]))
            position = finding.end
        parts.append(text[position:])
        return "".join(parts)

    def mask_json(self, masking: Masking, text: str) -> str:
        """Tool-call arguments: mask each JSON string, so the JSON stays valid."""
        try:
            data = json.loads(text)
        except ValueError:
            return self.mask(masking, text)
        masked = _map_strings(data, lambda s: self.mask(masking, s))
        # Unchanged JSON keeps its caller's spelling (and the engine's prefix cache its hits).
        return text if masked == data else json.dumps(masked, ensure_ascii=False)

    def mask_schema(self, masking: Masking, text: str) -> str:
        """A tool's JSON Schema: the prose and values in it, never its keywords or names."""
        if not text:
            return text
        try:
            schema = json.loads(text)
        except ValueError:
            return self.mask(masking, text)
        masked = _mask_schema(schema, lambda s: self.mask(masking, s))
        return text if masked == schema else json.dumps(masked, ensure_ascii=False)

    def sanitize(
        self, request: inference_pb2.GenerateRequest
    ) -> tuple[inference_pb2.GenerateRequest, Masking]:
        """A copy of the request with every text masked (messages, tool calls, results, tools).

        One Masking serves the whole request, so a value gets the same placeholder in a tool
        result, in earlier call arguments and in the prompt.
        """
        sanitized = inference_pb2.GenerateRequest()
        sanitized.CopyFrom(request)
        masking = Masking(_written_text(request))
        if request.HasField("chat"):
            for message in sanitized.chat.messages:
                if message.role == types_pb2.ROLE_TOOL:
                    message.content = self.mask_json(masking, message.content)
                else:
                    message.content = self.mask(masking, message.content)
                for call in message.tool_calls:
                    call.arguments = self.mask_json(masking, call.arguments)
        else:
            sanitized.prompt = self.mask(masking, request.prompt)
        for tool in sanitized.tools.tools:
            tool.description = self.mask(masking, tool.description)
            tool.parameters = self.mask_schema(masking, tool.parameters)
        return sanitized, masking


def _written_text(request: inference_pb2.GenerateRequest) -> str:
    """Everything the client wrote that a placeholder could collide with."""
    parts = [request.prompt]
    for message in request.chat.messages:
        parts.append(message.content)
        parts.extend(call.arguments for call in message.tool_calls)
    for tool in request.tools.tools:
        parts += (tool.description, tool.parameters)
    return "\n".join(parts)


# Schema keywords whose strings are the caller's prose or data: descriptions, examples, enum
# values. Everything else (types, $ref, patterns, property names, required) is structure, and
# masking it would change what the schema means.
_SCHEMA_TEXT_KEYS = frozenset({"description", "title", "default", "examples", "enum", "const"})


def _mask_schema(schema: Any, mask: Callable[[str], str]) -> Any:
    if isinstance(schema, list):
        return [_mask_schema(item, mask) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: _map_strings(value, mask) if key in _SCHEMA_TEXT_KEYS else _mask_schema(value, mask)
        for key, value in schema.items()
    }
