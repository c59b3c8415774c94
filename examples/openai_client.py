"""service-slm with the official `openai` client: list models, one answer, one streamed answer."""

from __future__ import annotations

import os
import sys

from openai import OpenAI


def main() -> int:
    base_url = os.environ.get("SLM_URL", "http://127.0.0.1:8080")
    model = os.environ.get("SLM_MODEL", "gemma-3-270m")
    # The embedded default runs without API keys; the client insists on some value.
    client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("SLM_API_KEY", "unused"))

    print("models:", ", ".join(m.id for m in client.models.list().data))

    reply = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."},
        ],
        max_tokens=24,
        temperature=0,
        seed=42,
    )
    print("answer:", reply.choices[0].message.content)
    print("usage:", reply.usage)

    print("streamed: ", end="")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\nstream usage: {chunk.usage.completion_tokens} tokens")
        # service-slm's own figures ride on the final chunk as an extra "slm" field.
        extra = (chunk.model_extra or {}).get("slm")
        if extra:
            print(f"served by tier {extra['tier']} at {extra['upstream']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
