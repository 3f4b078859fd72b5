"""One stage of the GPU check (scripts/gpu_check.sh) without Hydra, which the GPU machine's
environment lacks: the benchmark preset's YAML (arpg/configs/bench_preset/) is read directly
(`arpg.reports.speed.load_preset`) and the library called. Each stage writes its JSON after
every row, so a stage cut short by its time limit keeps the rows it measured.

    python3 scripts/gpu_check.py bench_l gpu_check/            # the CUDA preset, ARPG-L
    python3 scripts/gpu_check.py bench_l gpu_check/ --dry-run  # the same code at toy size on the CPU
"""

import argparse
from pathlib import Path

from arpg.reports.speed import attention_kernels, bench_sample, load_preset

PRESETS = Path(__file__).resolve().parent.parent / "arpg" / "configs" / "bench_preset"
# stage -> (overrides of the CUDA preset, overrides of the dry-run preset, whose toy model stays)
STAGES = {
    # ARPG-L, batch 64, bf16: 64 and 32 steps, eager then CUDA graphs (peak MiB, first-call seconds)
    "bench_l": (dict(models=["ARPG-L"], steps=[64, 32], baselines=False, train_models=[]),
                dict(baselines=False, train_models=[])),
    # the attention kernels (SDPA backend) of one eager ARPG-L decode
    "kernels": (dict(models=["ARPG-L"], steps=[64]), {}),
    "bench_xl_xxl": (dict(models=["ARPG-XL", "ARPG-XXL"], steps=[64], baselines=False, count_ops=False,
                          train_models=[]), dict(baselines=False, count_ops=False, train_models=[])),
    # training tokens/s and MFU of ARPG-L
    "train": (dict(models=[], train_models=["ARPG-L"]), dict(models=[])),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("out", type=Path, help="folder for <stage>.json (and <stage>.png)")
    parser.add_argument("--dry-run", action="store_true", help="the dry-run preset: toy shapes on the CPU")
    args = parser.parse_args()
    cuda, dry = STAGES[args.stage]
    config = load_preset(PRESETS / ("dry_run.yaml" if args.dry_run else "cuda.yaml"), **(dry if args.dry_run else cuda),
                         output=str(args.out / f"{args.stage}.json"), plot=str(args.out / f"{args.stage}.png"))
    (attention_kernels if args.stage == "kernels" else bench_sample)(config)


if __name__ == "__main__":
    main()
