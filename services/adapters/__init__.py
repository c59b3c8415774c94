"""The adapter registry: LoRA adapter metadata and a content-addressed artefact store."""
