"""ledger: the append-only, hash-chained audit trail of the mesh."""
