"""The sanitiser and rehydrator as plain objects: presidio's pattern recognizers, no servers."""

from __future__ import annotations

import json

import pytest

from doorman.rehydrate import JsonRehydrator, Rehydrator
from doorman.safety import REDACTED, SafetyFilter
from doorman.sanitize import DetectionFailed, Finding, Masking, PresidioDetector, Sanitiser
from slm.errors import InvalidArgument
from slm.v1 import inference_pb2, types_pb2

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def sanitiser() -> Sanitiser:
    return Sanitiser(
        PresidioDetector(
            ["EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER", "URL"],
            custom_patterns={"EMPLOYEE_ID": r"\bEMP-\d{6}\b"},
            deny_terms=["Project Nightingale"],
        )
    )


def chat(
    *contents: str, role: types_pb2.Role.ValueType = types_pb2.ROLE_USER
) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="m",
        chat=types_pb2.ChatInput(
            messages=[types_pb2.ChatMessage(role=role, content=c) for c in contents]
        ),
    )


def test_same_value_same_placeholder_across_messages(sanitiser: Sanitiser) -> None:
    request = chat(f"Mail {EMAIL} please.", f"Again: {EMAIL}, and card {CARD}.")
    sanitised, masking = sanitiser.sanitize(request)
    first, second = (m.content for m in sanitised.chat.messages)
    assert first == "Mail <EMAIL_ADDRESS_1> please."
    assert second == "Again: <EMAIL_ADDRESS_1>, and card <CREDIT_CARD_1>."
    assert dict(masking.counts) == {"EMAIL_ADDRESS": 1, "CREDIT_CARD": 1}
    assert masking.placeholders == {"<EMAIL_ADDRESS_1>": EMAIL, "<CREDIT_CARD_1>": CARD}
    # The original request is left alone: only the copy goes upstream.
    assert EMAIL in request.chat.messages[0].content


def test_distinct_values_numbered_per_entity(sanitiser: Sanitiser) -> None:
    masking = Masking()
    text = sanitiser.mask(masking, "a@example.com, b@example.org, a@example.com")
    assert text == "<EMAIL_ADDRESS_1>, <EMAIL_ADDRESS_2>, <EMAIL_ADDRESS_1>"
    assert masking.counts["EMAIL_ADDRESS"] == 2


def test_card_checksum_custom_pattern_and_deny_term(sanitiser: Sanitiser) -> None:
    masking = Masking()
    text = sanitiser.mask(
        masking, "Card 4111 1111 1111 1112 fails Luhn; EMP-123456 works on project nightingale."
    )
    assert "4111 1111 1111 1112" in text
    assert "<EMPLOYEE_ID_1>" in text
    assert "<DENY_TERM_1>" in text
    assert "nightingale" not in text


def test_unicode_text_keeps_its_offsets(sanitiser: Sanitiser) -> None:
    masking = Masking()
    text = sanitiser.mask(masking, f"Grüße 👋 an {EMAIL} 日本語 danke, naïve café")
    assert text == "Grüße 👋 an <EMAIL_ADDRESS_1> 日本語 danke, naïve café"
    rehydrator = Rehydrator(masking.placeholders)
    restored = rehydrator.feed(text) + rehydrator.flush()
    assert restored == f"Grüße 👋 an {EMAIL} 日本語 danke, naïve café"


def test_nothing_detected_leaves_text_and_mapping_empty(sanitiser: Sanitiser) -> None:
    sanitised, masking = sanitiser.sanitize(chat("Name three colours."))
    assert sanitised.chat.messages[0].content == "Name three colours."
    assert masking.placeholders == {}
    assert not masking.counts


def test_tool_arguments_are_masked_and_restored_as_valid_json(sanitiser: Sanitiser) -> None:
    arguments = json.dumps({"to": EMAIL, "cc": [EMAIL, 'o"hara@example.com'], "n": 3})
    sanitised, masking = sanitiser.sanitize(chat(arguments, role=types_pb2.ROLE_TOOL))
    masked = json.loads(sanitised.chat.messages[0].content)
    assert masked == {
        "to": "<EMAIL_ADDRESS_1>",
        "cc": ["<EMAIL_ADDRESS_1>", masked["cc"][1]],
        "n": 3,
    }
    # A model's tool call that uses the placeholders comes back as valid JSON with the values.
    call = json.dumps({"recipient": "<EMAIL_ADDRESS_1>", "unknown": "<EMAIL_ADDRESS_9>"})
    rehydrator = JsonRehydrator(masking.placeholders)
    assert json.loads(rehydrator.feed(call) + rehydrator.flush()) == {
        "recipient": EMAIL,
        "unknown": "<EMAIL_ADDRESS_9>",
    }


def test_placeholders_the_client_wrote_are_not_reused(sanitiser: Sanitiser) -> None:
    sanitised, masking = sanitiser.sanitize(chat(f"Literal <EMAIL_ADDRESS_1> and {EMAIL}"))
    assert sanitised.chat.messages[0].content == "Literal <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>"
    assert masking.placeholders == {"<EMAIL_ADDRESS_2>": EMAIL}


def test_raw_prompt_is_masked(sanitiser: Sanitiser) -> None:
    request = inference_pb2.GenerateRequest(model="m", prompt=f"ip 10.1.2.3 card {CARD}")
    sanitised, masking = sanitiser.sanitize(request)
    assert sanitised.prompt == "ip <IP_ADDRESS_1> card <CREDIT_CARD_1>"
    assert set(masking.counts) == {"IP_ADDRESS", "CREDIT_CARD"}


class BrokenDetector:
    def detect(self, text: str) -> list[Finding]:
        raise RuntimeError("regex engine timed out")


def test_detection_failure_fails_closed() -> None:
    with pytest.raises(DetectionFailed) as caught:
        Sanitiser(BrokenDetector()).sanitize(chat(f"mail {EMAIL}"))
    assert "not sent upstream" in caught.value.message
    assert caught.value.reason == "SANITIZE_FAILED"


PLACEHOLDERS = {"<EMAIL_ADDRESS_1>": EMAIL, "<CREDIT_CARD_1>": CARD, "<EMAIL_ADDRESS_10>": "x@y.io"}


def rehydrate(chunks: list[str]) -> tuple[str, list[str]]:
    rehydrator = Rehydrator(PLACEHOLDERS)
    outputs = [rehydrator.feed(chunk) for chunk in chunks]
    outputs.append(rehydrator.flush())
    return "".join(outputs), outputs


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_split_placeholders_are_restored_at_any_chunk_size(size: int) -> None:
    text = "Write to <EMAIL_ADDRESS_1> or <EMAIL_ADDRESS_10>; card <CREDIT_CARD_1>."
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    restored, _ = rehydrate(chunks)
    assert restored == f"Write to {EMAIL} or x@y.io; card {CARD}."


def test_only_a_possible_placeholder_prefix_is_held_back() -> None:
    _, outputs = rehydrate(["Hello <EMA", "IL_ADDRESS_1> and a < b <", "b>", " end"])
    assert outputs == ["Hello ", f"{EMAIL} and a < b ", "<b>", " end", ""]


def test_unknown_and_mangled_placeholders_pass_through() -> None:
    text = "<EMAIL_ADDRESS_2> <EMAIL_ADDRESS_1 <EMAIL_ADRESS_1> <CREDIT_CARD_1"
    restored, _ = rehydrate([text[:9], text[9:30], text[30:]])
    assert restored == text


def test_input_deny_pattern_is_refused_with_a_clear_error() -> None:
    safety = SafetyFilter([r"\bdrop\s+table\b"], [])
    safety.check_input(["hello"])
    with pytest.raises(InvalidArgument) as caught:
        safety.check_input(["hi", "please DROP  TABLE users"])
    assert "safety filter" in caught.value.message
    assert caught.value.field == "messages[1].content"


def test_output_deny_pattern_is_redacted_across_chunks() -> None:
    safety = SafetyFilter([], [r"secret-\d+"], redact=True, window=16)
    output = safety.output_filter()
    assert output is not None
    parts = [output.feed(chunk).text for chunk in ["the code is sec", "ret-42", " ok, bye now"]]
    parts.append(output.flush())
    assert "".join(parts) == f"the code is {REDACTED} ok, bye now"
    assert output.triggered


def test_output_deny_pattern_can_end_the_stream() -> None:
    output = SafetyFilter([], ["forbidden"], redact=False, window=16).output_filter()
    assert output is not None
    first = output.feed("this is forb")
    assert not first.stop
    second = output.feed("idden text")
    assert second.stop
    assert first.text + second.text == "this is "
