"""Layer 3, what a compiled graph runs: fake-quant modules, integer modules and kernels
(portable torch, oneDNN, the fused C++ attention in ``csrc/``), Log-Int-Softmax. Imports
``quant``, ``ir`` and ``errors``."""
