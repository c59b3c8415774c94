"""The composition root: the service table, the settings, `slm up`, `slm serve` and the CLI."""
