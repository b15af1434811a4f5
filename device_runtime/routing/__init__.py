"""Routing: the pure cost model (eqs. 1-12), policies, routers and the router bundle format."""
