#!/usr/bin/env bash
# The GPU checks of issue #14 in one call, within 8 minutes on one H100:
#   1. `pytest -m cuda`: cache equivalence, bf16 decode, compiled static step == eager (CUDA graphs);
#   2. the benchmark's cuda preset (arpg/configs/bench_preset/cuda.yaml) for ARPG-L, then ARPG-XL and
#      ARPG-XXL (random weights): batch 64, 32 and 64 steps, bf16, eager vs CUDA graphs: images/s,
#      peak memory and kernels per step per layer; training tokens/s and MFU of ARPG-L.
# Each stage has its own time limit, so a slow stage cannot take the others' results with it.
# Everything lands in $OUT (default gpu_check/): env.txt, pytest_cuda.txt, bench_*.{txt,json,png}.
#
#   bash scripts/gpu_check.sh              # on a CUDA machine
#   DRY_RUN=1 bash scripts/gpu_check.sh    # the same stages at toy size on the CPU (about a minute)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"

if [ "${DRY_RUN:-0}" = 1 ]; then
    preset=dry_run; first="models=[ARPG-tiny] train_models=[ARPG-tiny]"; second="models=[ARPG-tiny] train_models=[]"
else
    preset=cuda; first="models=[ARPG-L] train_models=[ARPG-L]"; second="models=[ARPG-XL,ARPG-XXL] train_models=[]"
fi
status=0
run() {  # run <seconds> <log> <command...>: time-limited, output to the terminal and the log
    local limit=$1 log=$2; shift 2
    echo "== $* (limit ${limit} s)" | tee "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== exit status $rc" | tee -a "$OUT/$log"; status=1; }
}

{ date; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python -c "import torch; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
run 150 pytest_cuda.txt python -m pytest -q -m cuda tests/test_cuda.py
run 150 bench_l.txt python scripts/bench_sample.py bench_preset=$preset $first \
    output=$OUT/bench_l.json plot=$OUT/bench_l.png
run 150 bench_xl_xxl.txt python scripts/bench_sample.py bench_preset=$preset $second \
    output=$OUT/bench_xl_xxl.json plot=$OUT/bench_xl_xxl.png
echo "== done: $OUT (status $status)"
exit $status
