"""service-slm over gRPC with the generated `slm.v1` stubs, through Envoy: a streamed chat."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import grpc

from slm.v1 import doorman_pb2, doorman_pb2_grpc, types_pb2


async def main() -> int:
    target = os.environ.get("SLM_GRPC_TARGET", "127.0.0.1:8080")
    model = os.environ.get("SLM_MODEL", "gemma-3-270m")
    metadata = [("x-request-id", f"grpc-example-{uuid.uuid4().hex[:8]}")]
    if key := os.environ.get("SLM_API_KEY"):
        metadata.append(("authorization", f"Bearer {key}"))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = doorman_pb2_grpc.DoormanServiceStub(channel)
        listed = await stub.ListModels(doorman_pb2.DoormanServiceListModelsRequest())
        print("models:", ", ".join(m.name for m in listed.models))
        request = doorman_pb2.ChatRequest(
            model=model,
            messages=[
                types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content="You are terse."),
                types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Name three colours."),
            ],
            sampling=types_pb2.SamplingParams(max_tokens=24, temperature=0.0, seed=42),
        )
        print("answer: ", end="")
        try:
            async for event in stub.Chat(request, metadata=metadata):
                if event.HasField("delta"):
                    print(event.delta.text, end="", flush=True)
                else:
                    end = event.end
                    print()
                    print(
                        f"finish: {types_pb2.FinishReason.Name(end.finish_reason)}, "
                        f"tokens: {end.usage.completion_tokens}, "
                        f"tier: {types_pb2.Tier.Name(end.tier)}"
                    )
        except grpc.aio.AioRpcError as error:
            print(f"\nfailed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
