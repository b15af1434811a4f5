"""Training, ONNX export and INT8 quantization of the BERT router (needs the ``export`` extra)."""
