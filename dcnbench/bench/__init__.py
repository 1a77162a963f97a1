"""Benchmarks: ``dcnbench.bench.ops`` times the operators against torchvision and the dense baselines."""
