"""Layer 1, the graph: tracing a model into torch.fx, the typed node annotations (``meta``),
graph patterns (attention, softmax, scale-transparent ops) and shape helpers. Imports only
``fxquant.errors``."""
