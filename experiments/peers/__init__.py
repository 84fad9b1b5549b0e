"""Benchmark workers: the same timed workload in mnres (JAX), PyTorch and Keras (TensorFlow).

Each worker runs in its own process, so that its peak memory and thread pool are its own;
`experiments.benchmark` starts them one after the other. See `workload` for the protocol.
"""
