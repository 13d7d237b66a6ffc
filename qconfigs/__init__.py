"""YAML qconfig presets shipped with fxquant; load one with ``fxquant.load_qconfig(name)``."""
