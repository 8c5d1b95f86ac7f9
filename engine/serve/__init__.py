"""The gRPC service: ``server`` (the service over one Engine), ``batching`` (dynamic batching across
streams), ``wire`` (proto <-> engine types), ``config`` (ServerConfig), ``client`` (MimeticClient) and
``cli`` (``mimetic serve`` and ``mimetic call``)."""
