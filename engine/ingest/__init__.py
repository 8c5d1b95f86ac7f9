"""City-scale ingestion: ``job`` (dumps -> sharded Parquet, exactly once, resumable), ``ray`` (the same
job on Ray Data), ``query`` (text search over a run) and ``cli`` (``mimetic ingest`` and ``mimetic query``)."""
