"""Edge side of edgeroute: a gRPC service streaming a large LLM, with per-session KV caches."""
