"""Device side of edgeroute: the cost model, routers and the on-device runtime.

Importing this package has no side effects: no model loads, no clients.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
