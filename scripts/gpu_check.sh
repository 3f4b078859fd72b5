#!/usr/bin/env bash
# The first GPU check in one call, within 8 minutes on one H100, stages ordered by value, each
# with its own time limit (a slow stage cannot take the others' results with it) and writing its
# JSON after every row (a stage cut short keeps the rows it measured):
#   1. pytest_cuda: `pytest -m cuda` (cache equivalence, bf16 decode, compiled static step ==
#      eager, CUDA graph replays, no recompiles for a later batch);
#   2. bench_l: ARPG-L (random weights), batch 64, bf16, 64 and 32 steps, eager vs CUDA graphs:
#      images/s, peak MiB (each row with the caches of the rows before freed), first-call
#      seconds (the compile), kernels per step per layer;
#   3. kernels: the attention kernels (SDPA backend) of one eager ARPG-L decode, from the profiler;
#   4. bench_xl_xxl: the same as 2 for ARPG-XL and ARPG-XXL at 64 steps;
#   5. train: training tokens/s and MFU of ARPG-L.
# Needs no Hydra (the GPU machine's environment has none): the stages call the library through
# scripts/gpu_check.py. The benchmark stages run with TORCH_LOGS=recompiles, so every recompile
# and its reason lands in the stage's log. Everything lands in $OUT (default gpu_check/):
# env.txt, <stage>.txt (log), <stage>.json, bench_*.png.
#
#   bash scripts/gpu_check.sh              # on a CUDA machine
#   DRY_RUN=1 bash scripts/gpu_check.sh    # the same stages at toy size on the CPU, Hydra hidden
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dry=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    # As on the GPU machine: importing hydra, omegaconf or antlr4 fails.
    hidden="$(mktemp -d)"
    trap 'rm -rf "$hidden"' EXIT
    for module in hydra omegaconf antlr4; do
        echo "raise ModuleNotFoundError(\"No module named '$module' (hidden by DRY_RUN)\")" > "$hidden/$module.py"
    done
    export PYTHONPATH="$hidden:$PYTHONPATH"
    dry=(--dry-run)
fi
status=0
run() {  # run <seconds> <stage> <command...>: time-limited, output to the terminal and $OUT/<stage>.txt
    local limit=$1 stage=$2; shift 2
    echo "== $stage: $* (limit ${limit} s)" | tee "$OUT/$stage.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$stage.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $stage: exit status $rc after $((SECONDS - start)) s" | tee -a "$OUT/$stage.txt"
    [ "$rc" = 0 ] || status=1
}

{ date; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python3 -c "import torch; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# (-p no:hydra_pytest: where hydra-core is installed but hidden, its pytest plugin must not load)
run 80 pytest_cuda python3 -m pytest -q -m cuda -p no:cacheprovider -p no:hydra_pytest tests/test_cuda.py
export TORCH_LOGS=recompiles
run 150 bench_l python3 scripts/gpu_check.py bench_l "$OUT" "${dry[@]}"
run 40 kernels python3 scripts/gpu_check.py kernels "$OUT" "${dry[@]}"
run 120 bench_xl_xxl python3 scripts/gpu_check.py bench_xl_xxl "$OUT" "${dry[@]}"
run 50 train python3 scripts/gpu_check.py train "$OUT" "${dry[@]}"
echo "== done: $OUT (status $status)"
exit $status
