"""service-slm's chat WebSocket: the same JSON chunks as SSE, one frame each, then [DONE]."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect


async def main() -> int:
    base_url = os.environ.get("SLM_URL", "http://127.0.0.1:8080")
    model = os.environ.get("SLM_MODEL", "gemma-3-270m")
    url = base_url.replace("http", "ws", 1) + "/v1/chat/completions/ws"
    request = {
        "model": model,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 24,
        "stream_options": {"include_usage": True},
    }
    if key := os.environ.get("SLM_API_KEY"):
        request["api_key"] = key
    async with connect(url) as socket:
        # One socket carries one request after another; closing it mid-answer cancels it.
        await socket.send(json.dumps(request))
        print("answer: ", end="")
        async for frame in socket:
            if frame == "[DONE]":
                break
            chunk = json.loads(frame)
            if "error" in chunk:
                print(f"\nfailed: {chunk['error']['message']}", file=sys.stderr)
                return 1
            for choice in chunk["choices"]:
                print(choice["delta"].get("content", ""), end="", flush=True)
            if chunk.get("usage"):
                print(f"\ntokens: {chunk['usage']['completion_tokens']}")
            if chunk.get("slm"):
                print(f"tier: {chunk['slm']['tier']}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
