"""Model backends of the edge service: one small interface and a name registry."""

from edge_service.backends.base import (
    Backend,
    Slot,
    available_backends,
    create_backend,
    register_backend,
)

__all__ = ["Backend", "Slot", "available_backends", "create_backend", "register_backend"]
