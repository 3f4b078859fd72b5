"""Sample quality against decoding steps on the digits: the CPU analogue of the paper's steps-vs-FID
table (see `arpg.reports.quality`).

    python scripts/bench_quality.py                    # trains the default digits model first; writes docs/bench_quality.*
    python scripts/bench_quality.py checkpoint=runs/tiny_digits/model.safetensors
    python scripts/bench_quality.py samples=200 steps=[1,8,64] output_json=q.json output_plot=q.png
"""

from arpg.cli import hydra_main
from arpg.reports.quality import BenchQualityConfig, bench_quality

if __name__ == "__main__":
    hydra_main(bench_quality, BenchQualityConfig, "bench_quality")
