"""Features: training data, batches, and the feature cache (shards, local and Ray engines)."""
