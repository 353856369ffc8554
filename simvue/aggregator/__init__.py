"""The aggregator: one per run, on rank 0 or in the pool's parent.  It tracks every sender,
merges their metrics and is the only writer to the sink."""
