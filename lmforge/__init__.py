"""Shared foundation of lmforge: typed configs, user-facing errors, rank-aware logging."""

__version__ = "0.1.0"
