#!/usr/bin/env bash
# The CUDA checks as one time-boxed script for a machine with one GPU (run from the repo root with a
# python whose torch sees CUDA; wheels in .whl/ are installed first where that python lacks them).
# Correctness pieces run side by side (the GPU's 141 GB and 16 cores hold them), the timed ones
# after, alone. Each piece has its own time limit; a failing piece does not stop the rest.
# Everything goes to $OUT/log.txt (default /tmp/gpu_check), bench/RESULTS.md gets a CUDA section.
#   correctness: the gpu-marked tests (NCCL data parallel / FSDP2 vs torch among them),
#                the recipe in fp16 and bf16 on CUDA and a bit-for-bit replay of the bf16 run
#   timed:       checkpoint save/load/async stall with the state on CUDA, the benchmark suite
# The lent H200 (torch 2.11, Python 3.12) lacks tyro, tensorboardX, isal and mmengine (the tests'
# oracle); before the call, here: echo /.whl/ >>.git/info/exclude, then
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl tyro==1.0.17 \
#     docstring-parser typeguard==4.6.1 tensorboardX==2.6.5 isal==1.9.1 mmengine==0.10.7 addict \
#     termcolor yapf platformdirs
# and carry .whl. Seen 2026-11-30: the correctness pieces take ~50 s side by side, the benchmark
# needs more than the 330 s left to it (quick's 27 fresh processes; stopped, it keeps its rows).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then  # one by one: a wheel that does not fit loses only itself
    for w in .whl/*.whl; do
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w" >>"$LOG" 2>&1 ||
            echo "== wheel $w did not install" >>"$LOG"
    done
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
T0=$(date +%s)

piece() {  # piece NAME SECONDS CMD...: run with a limit, its output to $OUT/NAME.part
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$OUT/$name.part" 2>&1
    rc=$?
    echo "== $name rc=$rc $(($(date +%s) - start))s (at $(($(date +%s) - T0))s)" >>"$OUT/$name.part"
}

collect() {  # append the parts to the log, in order
    for f in "$@"; do cat "$OUT/$f.part" >>"$LOG" && rm -f "$OUT/$f.part"; done
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, fengine; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'threads', torch.get_num_threads())"
    nproc
} >>"$LOG" 2>&1

GPU_TESTS="tests/test_devices.py tests/test_compile.py tests/test_async_checkpoint.py tests/test_checkpoint.py
           tests/test_data.py tests/test_data_gather.py tests/test_init.py tests/test_logging_handlers.py tests/test_metrics.py
           tests/test_one_process_group.py"
W=/tmp/gpu_check_work
rm -rf $W && mkdir -p $W
piece tests 170 $PY -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS &
(
    piece fp16 60 $PY recipes/classify.py --device cuda --work-dir $W/fp16 --max-steps 200 --amp float16
    piece bf16 60 $PY recipes/classify.py --device cuda --work-dir $W/bf16 --max-steps 200 --amp bfloat16
    piece replay 60 $PY -m fengine replay $W/bf16
) &
wait
collect tests fp16 bf16 replay

piece ckpt 60 $PY bench/checkpoint_io.py --gb 0.25 --repeats 1 --device cuda
collect ckpt
piece bench 330 $PY bench/run.py --quick --device cuda  # stopped at its limit, it writes the rows so far
collect bench
cp bench/RESULTS.md "$OUT/RESULTS.md"
echo "== total $(($(date +%s) - T0))s" >>"$LOG"
grep "^== " "$LOG"
