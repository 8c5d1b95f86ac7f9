"""mimetic's engine: everything around the kernels (views, decoding, the CLI; later models, pipeline, serving).

Importing ``engine`` stays light: no torch, so ``mimetic --help`` answers at once. Modules that need
torch import it themselves.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mimetic")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
