"""Infinite Chat: one stateless replica of a horizontally scalable chat (Quart on Hypercorn, Redis behind)."""

from .app import create_app
from .config import Settings

__all__ = ["Settings", "create_app"]
