"""The Envoy edge: a static bootstrap rendered from the mesh settings."""

from gateway.envoy.render import envoy_binary, render_envoy_config

__all__ = ["envoy_binary", "render_envoy_config"]
