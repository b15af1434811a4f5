"""Model backends of the edge service: one small interface and a name registry."""

from edge_service.backends.base import BACKENDS, Backend, BackendFactory, Slot

__all__ = ["BACKENDS", "Backend", "BackendFactory", "Slot"]
