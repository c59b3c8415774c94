"""service-slm common package: config, server bootstrap, errors, telemetry and the slm.v1 stubs."""

__version__ = "0.1.0"
