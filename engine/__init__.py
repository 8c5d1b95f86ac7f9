"""mimetic's engine: everything around the kernels (views, decoding, models, the pipeline, the CLI).

    from engine import Engine, EngineConfig, Panorama

Importing ``engine`` stays light: the pipeline (and torch with it) loads on first use of those
names, so ``mimetic --help`` answers at once.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mimetic")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "Engine": "engine.pipeline", "EngineConfig": "engine.config",
    "Panorama": "engine.types", "EmbedResult": "engine.types", "Prepared": "engine.types",
}

__all__ = ["EmbedResult", "Engine", "EngineConfig", "Panorama", "Prepared", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
