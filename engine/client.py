"""The gRPC client, importable where it always was: ``from engine.client import MimeticClient``."""
from engine.serve.client import AsyncMimeticClient, MimeticClient, ServerUnavailableError  # noqa: F401
