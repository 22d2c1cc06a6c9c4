"""lmforge: a reproducible laboratory for training language models end to end."""

__version__ = "0.1.0"
