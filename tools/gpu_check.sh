#!/usr/bin/env bash
# One short GPU slot, one command, at most LIMIT seconds (default 480): everything measured and checked on the device.
# Written to $OUT (default ./gpu_out), and shown as it comes:
#   env.txt          the machine, the versions, the commit
#   mamba_build.log  building mamba_ssm's selective-scan extension for this GPU (its time at the end)
#   test_scan.log    tests/test_scan.py on the compiled kernels: every failure listed (no -x)
#   scan.md          python bench.py scan: the scan table (Triton, mamba_ssm, pscan, training memory), row by row
#   bench.md         python bench.py mamba llama dass sslalm --budget (what is left); bench.err its stderr
# The tests run while mamba_ssm builds (CPU work); the scan table follows, so that it has mamba_ssm's column, and is
# the run's first measurement; the model benchmarks get the time that is left.
#
# The device has no network: what it lacks travels in git-ignored folders named in the device tool's `carry`:
#   .whl/            wheels (soundfile for audio.py, mambapy for test_scan.py):  tools/gpu_check.sh --wheels
#   .mamba_ssm_src/  mamba_ssm's csrc/selective_scan, the only part built:       tools/gpu_check.sh --mamba-source [DIR]
#                    (DIR: a mamba checkout or unpacked sdist; without it, tag $MAMBA_TAG is cloned from GitHub)
# --smoke: the whole script on CPU with tiny sizes and the Triton interpreter (tests/test_bench_scan.py runs it).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-480}
MAMBA_TAG=${MAMBA_TAG:-v2.3.2.post1}
WHEELS="soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 mambapy==1.2.0"

case "${1:-}" in
--wheels)
    exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS ;;
--mamba-source)
    rm -rf .mamba_ssm_src && mkdir -p .mamba_ssm_src/csrc
    src=${2:-}
    if [ -z "$src" ]; then
        src=$(mktemp -d)/mamba
        git clone -q --depth 1 --branch "$MAMBA_TAG" https://github.com/state-spaces/mamba "$src" || exit 1
    fi
    cp -r "$src/csrc/selective_scan" .mamba_ssm_src/csrc/ && echo "mamba_ssm's selective scan source in .mamba_ssm_src"
    exit ;;
--smoke)
    SMOKE=1 ;;
"")
    SMOKE=0 ;;
*)
    echo "usage: tools/gpu_check.sh [--smoke | --wheels | --mamba-source [DIR]]" >&2; exit 2 ;;
esac

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $((LIMIT - ($(date +%s) - START))); }
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    TESTS=(tests/test_scan.py -k "wrong_shapes_name_the_argument and ref")
    SCAN_ARGS=(--smoke --device cpu)
    BENCH_ARGS=(--smoke --device cpu)
else
    export TRITON_INTERPRET=0
    TESTS=(tests/test_scan.py)
    SCAN_ARGS=()
    BENCH_ARGS=()
fi
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
        .whl/*.whl && export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u
    git rev-parse HEAD 2> /dev/null || echo "commit: unknown (no .git)"
    nvidia-smi || echo "nvidia-smi: not found"
    nvcc --version | tail -1 || echo "nvcc: not found"
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| triton', triton.__version__, '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    for pkg in transformers mambapy soundfile pytest; do
        $PY -c "import $pkg; print('$pkg', getattr($pkg, '__version__', 'installed'))" 2> /dev/null \
            || echo "$pkg: missing"
    done
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

BUILD=""
if [ "$SMOKE" = 0 ] && [ -d .mamba_ssm_src/csrc/selective_scan ]; then
    echo "== building mamba_ssm's selective_scan_cuda in the background (log: mamba_build.log)"
    $PY -c "import bench; bench.build_mamba_ssm()" > "$OUT/mamba_build.log" 2>&1 &
    BUILD=$!
else
    echo "mamba_ssm: not built (no .mamba_ssm_src; tools/gpu_check.sh --mamba-source)" | tee "$OUT/mamba_build.log"
fi

echo "== ${TESTS[*]} (TRITON_INTERPRET=$TRITON_INTERPRET), every failure"
timeout $(($(left) / 2)) $PY -m pytest "${TESTS[@]}" -q -p no:cacheprovider -rfE > "$OUT/test_scan.log" 2>&1
echo "exit status $?" >> "$OUT/test_scan.log"
grep -E "^(FAILED|ERROR) |passed|failed|exit status" "$OUT/test_scan.log"

if [ -n "$BUILD" ]; then
    echo "== waiting for the mamba_ssm build"
    for _ in $(seq 1 "$(($(left) / 3))"); do kill -0 "$BUILD" 2> /dev/null || break; sleep 1; done
    kill "$BUILD" 2> /dev/null && echo "mamba_ssm build stopped: out of time" >> "$OUT/mamba_build.log"
    tail -n 3 "$OUT/mamba_build.log"
fi

echo "== python bench.py scan ${SCAN_ARGS[*]}"
timeout $(($(left) * 2 / 3)) $PY bench.py scan "${SCAN_ARGS[@]}" 2>&1 | tee "$OUT/scan.md"

budget=$(($(left) - 60))
if [ "$SMOKE" = 1 ]; then budget=0; fi
echo "== python bench.py mamba llama dass sslalm --budget $budget ${BENCH_ARGS[*]}"
timeout $((budget + 50)) $PY bench.py mamba llama dass sslalm --budget "$budget" "${BENCH_ARGS[@]}" 2> "$OUT/bench.err" \
    | tee "$OUT/bench.md"
status=${PIPESTATUS[0]}
echo "== bench.py exit status $status; stderr (last lines):"
grep -v '^\[transformers\]' "$OUT/bench.err" | tail -n 20
echo "== done in $(($(date +%s) - START)) s"
