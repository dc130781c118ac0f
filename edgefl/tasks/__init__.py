"""Built-in learning tasks (data, partition, evaluation) for demos, tests and benchmarks."""
