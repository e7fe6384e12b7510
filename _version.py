"""The package version, in a leaf module that every layer may import (pyproject.toml reads it too)."""

__version__ = "0.1.0"
