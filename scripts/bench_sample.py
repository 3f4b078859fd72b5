"""Sampling and training speed (see `arpg.reports.speed`).

    python scripts/bench_sample.py                        # CPU preset; writes docs/bench_sample.*
    python scripts/bench_sample.py bench_preset=cuda      # ARPG-L/XL/XXL, batch 64, eager vs CUDA graphs
    python scripts/bench_sample.py steps=[8,64] modes=[eager,graphs] threads=1 output=bench.json
"""

from arpg.cli import hydra_main
from arpg.reports.speed import BenchSampleConfig, bench_sample

if __name__ == "__main__":
    hydra_main(bench_sample, BenchSampleConfig, "bench_sample")
