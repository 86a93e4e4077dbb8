"""Transitional: the server helpers now live in tests/helpers.py.

Only tests/forwarding_support.py and tests/test_forwarding_*.py (another engineer's, still
being written) import this module; when they import from .helpers, delete this file.
"""

from __future__ import annotations

from .helpers import DLR, free_port, running_server, serving_in_thread

__all__ = ["DLR", "free_port", "running_server", "serving_in_thread"]
