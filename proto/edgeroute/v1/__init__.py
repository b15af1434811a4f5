"""Version 1 of the edge API: ``edge_pb2`` / ``edge_pb2_grpc`` (generated) and ``types`` (domain dataclasses)."""
