"""Layer 7, leaving the process: the safe ``.fxq`` format (save/load) and ONNX export."""
