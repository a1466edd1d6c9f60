#!/usr/bin/env bash
# The CUDA checks, on a machine with an NVIDIA GPU, in three steps that each end
# well inside 10 minutes on an H100/H200:
#
#   bash scripts/gpu_check.sh build-test   # build with CUDA required (fresh build dir), then the CUDA tests
#   bash scripts/gpu_check.sh verify       # compute-sanitizer memcheck over the CUDA tests (float64 reference,
#                                          # half precision, partial warps, side stream, graph replay)
#   bash scripts/gpu_check.sh variants     # the kernel variants alone (scripts/bench_cuda_variants.py)
#   bash scripts/gpu_check.sh bench        # kernel variants (scripts/bench_cuda_variants.py), op fp32/bf16/fp16,
#                                          # model vs transformers (800x1333, batch 1 and 8, fp32 and bf16), training step
#   bash scripts/gpu_check.sh cpu          # the host CPU: cpu-check (its instruction sets, the CPU kernel tests on
#                                          # its widest build, AVX-512 where it has it), then cpu-scaling (thread
#                                          # scaling of op and model)
#   bash scripts/gpu_check.sh profile      # Nsight Compute sections of the forward and backward kernels
#   bash scripts/gpu_check.sh all          # build-test, verify, bench, cpu and profile in order (5.5 minutes on an H200)
#
# Logs and JSON go to build/gpu-check; when $OUT is set (the lent GPU machine,
# which returns at most 8 files) they are also packed into $OUT/gpu-check.tgz
# after every step. A step that fails is
# reported as FAILED and the exit status is non-zero; a failed build stops at
# once. Python wheels the machine lacks (pycocotools) can sit in .whl/: they are
# installed into /tmp/site first. DDETR_CUDA_ARCHITECTURES picks the GPUs to
# build for (default 90: H100/H200). pytest runs with -n 0 (pyproject's addopts
# ask for xdist workers): in one process, which compute-sanitizer follows and
# which does not share the GPU with seven others.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOGS="build/gpu-check"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, output to the terminal and $LOGS/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* (limit ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  if ((rc == 0)); then
    echo "=== $name: ok ($((SECONDS - start))s)"
  else
    echo "=== $name: FAILED (exit $rc, $((SECONDS - start))s)"
    failed+=("$name")
  fi
  pack
  return "$rc"
}

ddetr() { "$PY" -m ddetr_cli "$@"; }

# Everything so far into one archive under $OUT, after every step, so a call
# cut off at its time limit still brings back what finished.
pack() { if [[ -n "${OUT:-}" ]]; then tar czf "$OUT/gpu-check.tgz" -C "$LOGS" .; fi; }

setup_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

build_test() {
  step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -n 2; nproc; \
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'"
  # A fresh build directory: one carried from another machine points at its nvcc.
  rm -rf build/cuda-check
  step build 400 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    --config-settings=build-dir=build/cuda-check \
    --config-settings=cmake.define.DDETR_CUDA=ON \
    "--config-settings=cmake.define.DDETR_CUDA_ARCHITECTURES=${DDETR_CUDA_ARCHITECTURES:-90}" || {
    echo "build failed; see $LOGS/build.log" >&2
    exit 1
  }
  step extension 60 "$PY" -c '
import ddetr_cli._C as c
print("has_cuda", c.has_cuda(), "devices", c.cuda_device_count(), "reason", repr(c.cuda_unavailable_reason()), "cpu isa", c.cpu_isa())
assert c.has_cuda() and c.cuda_device_count() > 0, "the extension does not see a CUDA device: " + c.cuda_unavailable_reason()
' || exit 1
  step pytest_cuda 400 "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_msda_cuda.py tests/test_cuda_graph.py \
    tests/test_msda.py tests/test_model.py -rs
}

verify() {
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "=== memcheck: compute-sanitizer not found"
    failed+=(memcheck)
    return
  fi
  # Without torch's caching allocator every tensor is its own allocation, so
  # memcheck sees an access past a tensor's end instead of inside a pooled block.
  # That rules out CUDA-graph capture (a cudaMalloc while capturing is refused),
  # so the graph tests run in build-test only.
  step memcheck 400 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
    --print-limit 20 "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_msda_cuda.py tests/test_msda.py -m cuda \
    -k "not model and not graph and not capture and not gradcheck"
}

variants() {
  # Forward paths and task orders side by side, kernel time only (CUDA graphs).
  step variants 200 "$PY" scripts/bench_cuda_variants.py --json "$LOGS/variants.json"
}

bench() {
  variants
  # Scattered reference points (no locality between neighbouring queries).
  step op_float32_random 120 ddetr bench --device cuda --case encoder-1333-random --batch-size 2 --warmup 3 --repeats 20 \
    --json "$LOGS/op_float32_random.json"
  for dtype in float32 bfloat16 float16; do
    step "op_$dtype" 120 ddetr bench --device cuda --dtype "$dtype" --case encoder-1333 --case decoder --batch-size 1 --batch-size 2 \
      --warmup 3 --repeats 20 --json "$LOGS/op_$dtype.json"
  done
  for batch in 1 8; do
    for dtype in float32 bfloat16; do
      step "model_b${batch}_$dtype" 150 ddetr bench --model --device cuda --input-size 800 1333 --batch-size "$batch" --dtype "$dtype" \
        --warmup 2 --repeats 5 --json "$LOGS/model_b${batch}_$dtype.json"
    done
  done
  step train_bf16 200 ddetr bench --train --device cuda --dtype bfloat16 --input-size 800 1066 --batch-size 2 --warmup 2 --repeats 6 \
    --json "$LOGS/train_bf16.json"
}

cpu_check() {
  step cpu_info 30 bash -c "lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Socket|L2|L3'; grep -o -w -E 'avx512[a-z_0-9]*|amx[a-z_0-9]*|avx2' /proc/cpuinfo | sort | uniq -c; \
    $PY -c 'import ddetr_cli._C as c; print(\"cpu isa\", c.cpu_isa(), \"compiled\", c.cpu_isas())'"
  # The CPU kernel's tests on the widest build this CPU runs (never run on the 2-core AVX2 development machine).
  step cpu_tests 200 "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_msda_cpu.py tests/test_msda.py -m "not cuda" -x
}

cpu_scaling() {
  # Thread scaling of the CPU op and model on the host's cores, one table each.
  step cpu_op_threads 200 ddetr bench --device cpu --threads 1,2,4,8,16 --case encoder --batch-size 1 --no-torch \
    --warmup 1 --repeats 3 --json "$LOGS/cpu_op_threads.json"
  step cpu_model_threads 200 ddetr bench --model --device cpu --threads 1,4,16 --no-hf --no-torch \
    --input-size 800 1066 --warmup 1 --repeats 2 --json "$LOGS/cpu_model_threads.json"
}

profile() {
  # Nsight Compute on one forward and one backward launch at the 800x1333 batch-2
  # encoder shape, head-major and query-major task order: speed of light, memory
  # workload, occupancy and warp stalls (where the time goes, without guessing).
  local code='
import torch
from ddetr_cli.bench.op import CASES, make_inputs
from ddetr_cli.ops import ms_deform_attn
value, spatial, start, loc, attn = make_inputs(CASES["encoder-1333"], 2, torch.float32, torch.device("cuda"))
v = value.requires_grad_()
for _ in range(2):
    out = ms_deform_attn(v, spatial, start, loc, attn, backend="native")
    out.backward(torch.ones_like(out))
torch.cuda.synchronize()
'
  for order in head query; do
    step "ncu_$order" 200 env DDETR_CUDA_ORDER=$order ncu --clock-control none --target-processes all \
      --kernel-name regex:msda_ --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section LaunchStats "$PY" -c "$code"
  done
}

setup_wheels || { echo "installing .whl/ failed" >&2; exit 1; }
case "${1:-all}" in
  build-test) build_test ;;
  verify) verify ;;
  bench) bench ;;
  variants) variants ;;
  cpu) cpu_check; cpu_scaling ;;
  cpu-check) cpu_check ;;
  cpu-scaling) cpu_scaling ;;
  profile) profile ;;
  all) build_test; verify; bench; cpu_check; cpu_scaling; profile ;;
  *) echo "usage: $0 build-test|verify|bench|variants|cpu|cpu-check|cpu-scaling|profile|all" >&2; exit 2 ;;
esac

if ((${#failed[@]})); then
  echo "FAILED steps: ${failed[*]} (logs in $LOGS)" >&2
  exit 1
fi
echo "all steps passed (logs in $LOGS)"
