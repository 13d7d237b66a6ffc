"""Layer 2, quantization numerics: specs and points, qparams, quantizers, the qconfig and its
presets, calibration data, observers (one module each, with a registry) and distributed
calibration. Imports ``ir`` and ``errors``."""
