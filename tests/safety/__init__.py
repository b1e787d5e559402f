"""Nothing lost, nothing silently wrong: integrity records, fail-closed checks, bad input, untrusted sources,
signals."""
