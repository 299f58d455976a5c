#!/usr/bin/env bash
# Build, check and time memgen on a CUDA machine in one go, for a lent GPU whose image already has
# torch, transformers, peft, triton, pytest and cmake (nothing is installed or downloaded):
#
#   bash benchmarks/gpu_session.sh build tests ops step-ops:small:1 calls:small:16 schedules:small:16 decode:small:1 train
#
# On H100 hosts: build 30 s, ops 40 s (2026-11-22); tests 340 s with the random cases on CPU and GPU,
# decode:small:16 165 to 240 s, step-ops:small:16 195 s, train 100 s (2026-11-24). A decode stage runs
# 6 implementations x 4 generate calls of 256 tokens, at 13 to 22 ms per step (bound by the host
# launching kernels). The build and the tests fill most of a 600 s call (the device tool's limit; with
# a decode stage after them it ran out): give decode stages calls of their own, two at most per call.
#
# Each stage named runs in that order; `build` compiles memgen._C in place from scratch (sm_90
# only, to save time). Build with the C++ compiler torch was built with (CC/CXX): on one GPU image
# the default g++ made every error raised from the extension crash (a segmentation fault while
# formatting the message) where /usr/bin/g++ did not. Everything is logged to $OUT/session.log,
# the benchmark folders are packed into $OUT/results.tar.gz after every stage, and the last lines
# printed are a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
bench_dir=$(mktemp -d)  # packed into $OUT/results.tar.gz after every stage
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log="$OUT/session.log"
summary=()

run_stage() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    summary+=("$name: exit $rc in $((SECONDS - start)) s")
    tar -czf "$OUT/results.tar.gz" -C "$bench_dir" .
    echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$log"
}

BENCH=(python3 -m memgen.cli bench --device cuda --no-progress)

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())"
    nvcc --version | tail -2
} >>"$log" 2>&1

for stage in "$@"; do
    case $stage in
        build)
            rm -rf build memgen/_C.cpython-3*-x86_64-linux-gnu.so
            TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 run_stage build 420 python3 setup.py build_ext --inplace
            run_stage backend 60 python3 -c "import memgen; print(memgen.ops.backend())"
            cp memgen/_C.cpython-3*-x86_64-linux-gnu.so "$OUT/" 2>/dev/null ;;
        tests)
            # Every test that touches CUDA, Triton or the native build; the CPU-only rest runs in CI.
            # The random cases (tests/test_random_cases.py) run each case on the CPU and on the GPU.
            run_stage tests 450 python3 -m pytest -q -rs --timeout 300 -p no:cacheprovider \
                tests/test_trigger_scoring.py tests/test_ragged_ops.py tests/test_native_build.py \
                tests/test_generation.py tests/test_transfers.py tests/test_sliding_windows.py tests/test_prefix_cache.py \
                tests/test_random_cases.py ;;
        cuda-tests)
            run_stage cuda-tests 200 python3 -m pytest -q -rs --timeout 150 -p no:cacheprovider -k cuda \
                tests/test_modeling.py tests/test_generation.py tests/test_trigger_scoring.py tests/test_ragged_ops.py tests/test_transfers.py \
                tests/test_sliding_windows.py tests/test_prefix_cache.py tests/test_random_cases.py ;;
        ops)
            run_stage ops 120 "${BENCH[@]}" --out "$bench_dir/ops-1.5b" --suite ops --preset qwen2.5-1.5b --rounds 30 ;;
        decode:*)  # decode:PRESET:BATCH, e.g. decode:small:16
            IFS=: read -r _ preset batch <<<"$stage"
            run_stage "$stage" 400 "${BENCH[@]}" --out "$bench_dir/decode-$preset-b$batch" --suite decode \
                --preset "$preset" --batch "$batch" --rounds 3 --skip reference ;;
        calls:*)  # calls:PRESET:BATCH: what a weaving step's decoder calls cost (benchmarks/call_costs.py)
            IFS=: read -r _ preset batch <<<"$stage"
            run_stage "$stage" 200 python3 benchmarks/call_costs.py --device cuda --preset "$preset" --batch "$batch" \
                --out "$bench_dir/calls-$preset-b$batch" ;;
        schedules:*)  # schedules:PRESET:BATCH: rows kept in step against the run-ahead schedule, and each mode's
            # weaver in its own calls against in the reasoner's (CUDA's default for every mode)
            IFS=: read -r _ preset batch <<<"$stage"
            run_stage "$stage" 400 python3 benchmarks/schedules.py --device cuda --preset "$preset" --batch "$batch" \
                --rounds 3 --other-weaver --out "$bench_dir/schedules-$preset-b$batch" ;;
        step-ops:*)  # step-ops:PRESET:BATCH: ops, kernel launches and copies per token (benchmarks/step_ops.py)
            IFS=: read -r _ preset batch <<<"$stage"
            run_stage "$stage" 200 python3 benchmarks/step_ops.py --device cuda --preset "$preset" --batch "$batch" \
                --out "$bench_dir/step-ops-$preset-b$batch" ;;
        syncs:*)  # syncs:PRESET:BATCH: where each decode configuration synchronises (benchmarks/sync_sites.py)
            IFS=: read -r _ preset batch <<<"$stage"
            run_stage "$stage" 200 python3 benchmarks/sync_sites.py --preset "$preset" --batch "$batch" ;;
        lora-vs-reference)
            run_stage lora-vs-reference 400 "${BENCH[@]}" --out "$bench_dir/decode-small-ref" --suite decode \
                --preset small --batch 1 --new-tokens 512 --rounds 3 --skip hf_generate always prompt_only head ;;
        train)
            run_stage train 400 "${BENCH[@]}" --out "$bench_dir/train-0.5b" --suite train --preset qwen2.5-0.5b --rounds 3 ;;
        *)
            echo "unknown stage $stage" | tee -a "$log"; exit 2 ;;
    esac
done

echo "== summary"
printf '%s\n' "${summary[@]}"
grep -E "passed|failed|error" "$log" | tail -5
for md in "$bench_dir"/*/results.md; do
    [ -f "$md" ] && sed -n '/^|/p' "$md"
done
