"""What every layer shares: chat messages, the name registry, settings-to-flags.

The bottom of the import order; it imports nothing else of ``device_runtime``.
"""
