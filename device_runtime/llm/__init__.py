"""The llama.cpp layer that the device and the edge share: messages to prompts,
the conversation with its KV prefix reuse, stop filtering, and the one adapter
that holds every call into llama-cpp-python internals."""
