"""Trace-driven simulation: traces, the simulator, metrics, response lengths, plots."""
