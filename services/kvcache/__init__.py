"""kv-cache: prefix states of inference engines, shared by replicas, kept over restarts."""
