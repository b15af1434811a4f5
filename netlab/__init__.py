"""Test tooling: an emulated wireless link between the device and the edge.

This kernel has no ``netem`` qdisc, so the link is built from three parts:

- two Linux network namespaces (device, edge) joined by a veth pair
  (:mod:`netlab.namespaces`);
- ``tc qdisc ... tbf`` on each veth end, which shapes the rate in the kernel;
- a userspace TCP relay in the device namespace that adds one-way delay and
  jitter per direction (:mod:`netlab.relay`).

An outage is ``ip link set ... down`` and then up again.  Nothing here is
imported by the runtime; it is used by tests and by ``scripts/bench_link.py``.
"""
