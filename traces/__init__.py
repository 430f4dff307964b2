"""Request traces: loaders for public traces, synthetic generators, the embedded default workload."""
