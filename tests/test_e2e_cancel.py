"""A client that goes away stops generation: shown with the engine's own counters."""

from __future__ import annotations

import httpx
import pytest
from helpers import DEFAULT_MODEL, Mesh, metric_value, wait_for

pytestmark = pytest.mark.e2e

MAX_TOKENS = 1500


def engine_counters(mesh: Mesh) -> tuple[float, float]:
    text = httpx.get(mesh.inference_metrics_url).text
    return (
        metric_value(text, "slm_engine_generated_tokens_total", model=DEFAULT_MODEL),
        metric_value(
            text, "slm_engine_requests_total", model=DEFAULT_MODEL, finish_reason="cancelled"
        ),
    )


def test_closing_the_stream_stops_the_engine(mesh: Mesh) -> None:
    tokens_before, cancelled_before = engine_counters(mesh)
    with mesh.openai_client() as client:
        stream = client.completions.create(
            model=DEFAULT_MODEL,
            prompt="Count from one to one thousand: one, two,",
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=5,
            stream=True,
        )
        received = 0
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].text)
            if received == 3:
                break
        stream.close()
    # The engine batches sequences, so a later request proves nothing about this one: wait for
    # the engine's own count of cancelled sequences (it moves when the sequence leaves the
    # batch), then read how many tokens it had made by then.
    assert wait_for(lambda: engine_counters(mesh)[1] == cancelled_before + 1), engine_counters(mesh)
    tokens_after, _ = engine_counters(mesh)
    generated = tokens_after - tokens_before
    # The cancel crossed Envoy, the gateway, the Doorman and the engine within a few tokens.
    assert 3 <= generated < 100, generated
