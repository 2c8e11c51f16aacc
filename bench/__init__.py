"""Benchmark suite comparing qatkit with peer toolkits (torch.ao eager quantization first).

Not installed with qatkit; run from the repository root: ``python -m bench [--json] [--quick]
[--threads N]``. See :mod:`bench.suite` for the measurement registries.
"""
