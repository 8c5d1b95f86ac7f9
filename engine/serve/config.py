"""The gRPC server's settings (``engine.serve.server.ServerConfig``), apart so that building the CLI stays light."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
DEFAULT_RETRY_BUDGET_S = 60.0  # how long a client keeps retrying an unavailable server (MimeticClient, mimetic call)
# Trailing metadata on a RESOURCE_EXHAUSTED that will pass (the stream limit is full): the client retries it
# as it retries UNAVAILABLE. grpc core's own RESOURCE_EXHAUSTED (a message over the size limit) has none.
RETRY_LATER = ("mimetic-retry", "later")


@dataclass
class ServerConfig:
    """How the server listens and batches. Every field is a ``mimetic serve`` flag.

    The decoded-bytes budget is the Engine's (``EngineConfig.max_decode_mib``, ``--max-decode-mib``):
    one for the whole server, shared by every stream.
    """

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = DEFAULT_PORT  # 0: any free port (see MimeticServer.port)
    metrics_port: int | None = None  # Prometheus text format on http://host:metrics_port/metrics; None: off
    max_batch: int | None = None  # views per engine call; None: the Engine's batch_size
    max_delay_ms: float = 5.0  # the longest the first item of a batch waits for others
    max_in_flight: int = 16  # K: requests per stream read ahead of the responses written
    max_queue: int = 512  # items waiting for a batch, over every stream
    # Embed, Dream and Caption streams open at once, counted by the service after the token check (more are
    # refused with RESOURCE_EXHAUSTED). Health checks and reflection are not counted: they cannot be starved.
    max_streams: int = 64
    idle_timeout_s: float = 60.0  # a stream with nothing in flight that sends nothing this long is ended
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # both ways
    max_views: int = 64  # views per item
    max_thumbnail_size: int = 512
    grace_s: float = 30.0  # to finish in-flight work when draining; the process exits within grace_s + 1 s
    token: str | None = None  # bearer token; None: no authentication
    tls_cert: str | None = None  # PEM certificate chain (path); with tls_key: TLS
    tls_key: str | None = None
    # Dream (with --sd-model): the limits that keep one request from holding the model for minutes, and
    # the batching of views from every stream into diffusion calls.
    max_dream_steps: int = 100  # denoising steps of a dream's full schedule
    max_dream_views: int = 8  # views per Dream item
    max_dream_batch: int = 8  # images per diffusion call (DreamParams.batch_size, mimetic dream's --sd-batch-size)
    max_dream_delay_ms: float = 50.0  # the longest a diffusion call's first item waits for others
    max_caption_batch: int = 64  # views per captioner call (Caption, with --caption-model), over every stream

    def check(self) -> None:
        for name in ("max_in_flight", "max_queue", "max_streams", "max_message_bytes", "max_views", "max_thumbnail_size",
                     "max_dream_steps", "max_dream_views", "max_dream_batch", "max_caption_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_batch is not None and self.max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {self.max_batch}")
        for name in ("max_delay_ms", "max_dream_delay_ms"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not (self.idle_timeout_s > 0 and math.isfinite(self.idle_timeout_s)):
            raise ValueError(f"idle_timeout_s (--idle-timeout) must be a finite number of seconds > 0, got {self.idle_timeout_s}")
        if not (self.grace_s >= 0 and math.isfinite(self.grace_s)):
            raise ValueError(f"grace_s (--grace) must be a finite number of seconds >= 0, got {self.grace_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (tls_cert and tls_key)")
        if self.token is not None and not self.token:
            raise ValueError("an empty token would accept any 'Bearer ' header: pass a real token or none")
