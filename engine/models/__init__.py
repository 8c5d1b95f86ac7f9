"""Models: CLIP through open_clip (``clip``), attention backends (``attention``), a tiny offline CLIP (``tiny``).

``import engine.models`` stays light: the names below load torch and open_clip on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipModel": "engine.models.clip",
    "WeightsError": "engine.models.clip",
    "load_clip": "engine.models.clip",
    "read_state_dict": "engine.models.clip",
    "configure_attention": "engine.models.attention",
    "make_tiny_clip": "engine.models.tiny",
    "save_checkpoint": "engine.models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.models' has no attribute {name!r}")
