"""Routers: ``score(prompt, context) -> p in [0, 1]``, looked up by name.

``p`` is the router's estimate that the turn needs the edge LLM (eq. 10).
The fusion with latency (eq. 11) and the threshold (eq. 12) live once, in
:func:`Router.decide`, so every router shares them.
"""

from device_runtime.routing.routers.base import ROUTERS, Message, Router, RouterError

__all__ = ["ROUTERS", "Message", "Router", "RouterError"]
