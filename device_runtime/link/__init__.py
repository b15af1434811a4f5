"""The link to the edge: the gRPC client, profile files, the profiler, link fitting and online estimators."""
