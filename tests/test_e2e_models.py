"""Admin model endpoints and embeddings through the whole mesh."""

from __future__ import annotations

import httpx
import openai
import pytest
from helpers import DEFAULT_MODEL, Mesh

pytestmark = pytest.mark.e2e

FILE = "gemma-3-270m-q4_k_m.gguf"


def test_load_embed_unload(mesh: Mesh) -> None:
    with mesh.openai_client() as client:
        models = {m["id"]: m for m in httpx.get(f"{mesh.base_url}/v1/models").json()["data"]}
        assert models[DEFAULT_MODEL]["loaded"] is True

        admin = f"{mesh.base_url}/admin/models"
        loaded = httpx.post(
            f"{admin}/load",
            json={"name": "gemma-embed", "path": FILE, "embeddings": True, "context_length": 256},
            timeout=120,
        )
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["embeddings"] is True
        listed = {m["id"]: m for m in httpx.get(admin).json()["data"]}
        assert listed["gemma-embed"]["architecture"] == "gemma3"

        reply = client.embeddings.create(model="gemma-embed", input=["a cat", "a dog"])
        assert [len(d.embedding) for d in reply.data] == [640, 640]
        assert reply.usage.prompt_tokens > 2
        with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
            client.embeddings.create(model=DEFAULT_MODEL, input="x")

        refused = httpx.post(f"{admin}/load", json={"name": "evil", "path": "/etc/passwd"})
        assert refused.status_code == 400
        assert "outside the model directories" in refused.json()["error"]["message"]

        assert httpx.post(f"{admin}/unload", json={"name": "gemma-embed"}).status_code == 200
        assert "gemma-embed" not in {m["id"] for m in httpx.get(admin).json()["data"]}
        assert httpx.post(f"{admin}/unload", json={"name": "gemma-embed"}).status_code == 404
