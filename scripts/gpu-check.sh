#!/usr/bin/env bash
# The whole GPU check in one command, run from the repo root on the GPU machine:
#   1. the environment (GPU, driver, torch / transformers, free memory)   → OUT/env.txt
#   2. the carried wheels installed into a private target directory       (--wheels, default .gpu-wheels)
#   3. every CUDA test (`pytest -m gpu tests`)                            → OUT/gpu-tests.log, .xml
#   4. `python -m bench.gpu` at full size, random weights, each section under its own watchdog
#                                                                         → OUT/gpu.json, OUT/gpu.md
# under one global deadline (--deadline, default 540 s): the tests get at most --test-share of it, the
# benchmark what is left, and `timeout` ends any step that overruns. Results are written as each
# section finishes, so a deadline still leaves numbers.
#
#   bash scripts/gpu-check.sh [--dry-run] [--out DIR] [--deadline S] [--wheels DIR] [--sections a,b]
#
# --dry-run walks the same steps on this CPU machine at tiny size, with the packages the GPU machine
# lacks importable only from the wheels (scripts/device_sim), so the plumbing is proven before a
# device exists. Exit status: non-zero when a CUDA test failed or a step could not start.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY_RUN=0
OUT_DIR=${OUT:-$REPO/gpu-results}
DEADLINE_S=540
WHEELS=.gpu-wheels
SECTIONS=""
TEST_SHARE=0.35
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --deadline) DEADLINE_S=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --sections) SECTIONS=$2; shift 2 ;;
    --test-share) TEST_SHARE=$2; shift 2 ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ] && PY=$REPO/.venv/bin/python
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
END=$(( $(date +%s) + DEADLINE_S ))
left() { echo $(( END - $(date +%s) )); }
say() { echo "== gpu-check: $*" | tee -a "$OUT_DIR/steps.txt"; }
say "start $(date -u +%FT%TZ), deadline ${DEADLINE_S}s, dry run $DRY_RUN, python $PY"

# 1. Environment.
{
  date -u +%FT%TZ
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv
  "$PY" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} "
      f"transformers {transformers.__version__}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.get_device_name()} · {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
else:
    print("no CUDA device")
EOF
} 2>&1 | tee "$OUT_DIR/env.txt"

# 2. Carried wheels → a private target directory, first on the path.
SITE=$(mktemp -d)/site
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { say "installing the wheels from $WHEELS failed"; exit 1; }
  say "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into a private target"
else
  mkdir -p "$SITE"
  say "no wheels in $WHEELS (bash scripts/gpu-wheels.sh makes them)"
fi
export PYTHONPATH="$SITE:$REPO" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$DRY_RUN" = 1 ]; then
  export PYTHONPATH="$REPO/scripts/device_sim:$PYTHONPATH" ACESTEP_DEVICE_SITE="$SITE"
fi
"$PY" -c "import diffusers, peft, soundfile, acestep.handler, acestep.llm_inference" 2>&1 | tail -3 \
  | tee -a "$OUT_DIR/steps.txt"
"$PY" -c "import diffusers, peft, soundfile, acestep.handler" 2>/dev/null \
  || { say "the library does not import with these wheels"; exit 1; }

# 3. CUDA tests, at most TEST_SHARE of the deadline.
TEST_S=$("$PY" -c "import sys; print(max(1, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$(left)" "$TEST_SHARE")
say "pytest -m gpu (at most ${TEST_S}s)"
timeout -k 5 "$TEST_S" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider \
  --junitxml "$OUT_DIR/gpu-tests.xml" 2>&1 | tee "$OUT_DIR/gpu-tests.log"
TESTS_RC=${PIPESTATUS[0]}
say "pytest exit $TESTS_RC$([ "$TESTS_RC" = 124 ] && echo ' (watchdog: out of time)')"

# 4. Benchmarks with what is left; the outer timeout is the watchdog for a hang in native code.
BENCH_S=$(( $(left) - 5 ))
if [ "$BENCH_S" -gt 0 ]; then
  SIZE=()
  [ "$DRY_RUN" = 1 ] && SIZE=(--tiny --iters 1 --section-scale 1)
  [ -n "$SECTIONS" ] && SIZE+=(--sections "$SECTIONS")
  say "python -m bench.gpu (budget ${BENCH_S}s)"
  timeout -k 5 $(( BENCH_S + 3 )) "$PY" -m bench.gpu "${SIZE[@]}" --budget-s "$BENCH_S" \
    --out "$OUT_DIR/gpu.json" 2>&1 | tee "$OUT_DIR/bench.log"
  BENCH_RC=${PIPESTATUS[0]}
  say "bench exit $BENCH_RC$([ "$BENCH_RC" = 124 ] && echo ' (watchdog: out of time)')"
else
  say "no time left for the benchmarks"
fi
say "done in $(( DEADLINE_S - $(left) ))s; results in $OUT_DIR"
# pytest's 5 (nothing collected) is a failure too: the gpu marker selected nothing.
[ "$TESTS_RC" = 0 ] || exit 1
