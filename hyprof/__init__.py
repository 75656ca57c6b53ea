"""hyprof: profile hybrid CPU+GPU MoE inference. This package is the CLI only."""

__version__ = "0.1.0"
