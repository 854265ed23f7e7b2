"""postlab.benchmarks: throughput benchmarks against transformers."""
