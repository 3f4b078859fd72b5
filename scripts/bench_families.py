"""ARPG, LlamaGen and PAR on the digits at equal training steps: class accuracy, Frechet distance
and images/s against forward calls (see `arpg.reports.families`).

    python scripts/bench_families.py                      # trains the four models first (ARPG, ARPG-zeros,
                                                          # LlamaGen, PAR-4x), writes docs/bench_families.*
    python scripts/bench_families.py samples=200 steps=[1,8,64] train_overrides=[epochs=5] \
        train_root=runs/quick output_json=f.json output_plot=f.png
"""

from arpg.cli import hydra_main
from arpg.reports.families import BenchFamiliesConfig, bench_families

if __name__ == "__main__":
    hydra_main(bench_families, BenchFamiliesConfig, "bench_families")
