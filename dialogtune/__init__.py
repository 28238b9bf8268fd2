"""dialogtune: turn conversations into conversational models."""

__version__ = "0.1.0"
