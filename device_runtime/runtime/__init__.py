"""The device runtime: the orchestrator and its hooks (online routing), telemetry, dialogues."""
