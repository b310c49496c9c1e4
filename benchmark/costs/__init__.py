"""What a sub-model costs (MACs, FLOPs, params, bit-ops, latency) and how fast a step runs."""
