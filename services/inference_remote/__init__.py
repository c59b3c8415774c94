"""inference-remote: InferenceService over OpenAI-compatible HTTP upstreams."""
