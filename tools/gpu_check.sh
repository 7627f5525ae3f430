#!/usr/bin/env bash
# The checks for one short GPU slot, in one command. Everything is written to $OUT (default ./gpu_out):
#   env.txt        nvidia-smi, Python, torch, CUDA, triton and transformers versions, the commit
#   test_scan.log  tests/test_scan.py on the compiled Triton kernels (TRITON_INTERPRET=0)
#   bench.md       `python bench.py all --budget $BUDGET`: the tables for BENCHMARKS.md
#   bench.err      its stderr (the traceback of any case that printed "error: ...")
#
# The device image has torch, triton, transformers and pytest but neither soundfile (audio.py imports it, so
# sslalm.py and bench.py do) nor mambapy (an oracle of test_scan.py); they travel as wheels, for its Python 3.12:
#   here, once:             tools/gpu_check.sh --wheels     (downloads them into .whl/, which git then ignores)
#   on the device machine:  tools/gpu_check.sh              (the device tool's run with carry [".whl"])
# Nothing else is fetched: the device machine needs no network. Time: about BUDGET + SCAN_TIMEOUT + 30 s at most
# (defaults 360 + 150), inside one 600 s command. BENCH_ARGS are added to bench.py's arguments (a dry run on a
# machine without a GPU: BENCH_ARGS="--smoke --device cpu --threads 1" PYTHON=.venv/bin/python tools/gpu_check.sh).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-360}
SCAN_TIMEOUT=${SCAN_TIMEOUT:-150}
WHEELS="soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 mambapy==1.2.0"

if [ "${1:-}" = "--wheels" ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p .whl "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
        .whl/*.whl && export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u
    git rev-parse HEAD 2> /dev/null || echo "commit: unknown (no .git)"
    nvidia-smi || echo "nvidia-smi: not found"
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| triton', triton.__version__, '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    for pkg in transformers mambapy soundfile pytest; do
        $PY -c "import $pkg; print('$pkg', getattr($pkg, '__version__', 'installed'))" 2> /dev/null \
            || echo "$pkg: missing"
    done
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== tests/test_scan.py on the GPU (compiled Triton kernels)"
TRITON_INTERPRET=0 timeout "$SCAN_TIMEOUT" $PY -m pytest tests/test_scan.py -q -x -p no:cacheprovider \
    > "$OUT/test_scan.log" 2>&1
echo "exit status $?" >> "$OUT/test_scan.log"
tail -n 15 "$OUT/test_scan.log"

echo "== python bench.py all --budget $BUDGET ${BENCH_ARGS:-}"
timeout $((BUDGET + 60)) $PY bench.py all --budget "$BUDGET" ${BENCH_ARGS:-} > "$OUT/bench.md" 2> "$OUT/bench.err"
status=$?
cat "$OUT/bench.md"
echo "== bench.py exit status $status; stderr (last lines):"
grep -v '^\[transformers\]' "$OUT/bench.err" | tail -n 20
