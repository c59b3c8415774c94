"""REST gateway: OpenAI-compatible HTTP in front of the Doorman's gRPC API, plus its Envoy edge."""
