"""Throughput benchmarks of cnnjax on this machine: ``python -m benchmarks --mode=...``.

``harness`` times windows and writes the report; ``model_rows``, ``conv_rows`` and
``input_rows`` are the three modes; ``torch_peers`` holds the PyTorch peers (run in a
process of their own, where torch is installed); ``__main__`` parses the flags and
dispatches.
"""
