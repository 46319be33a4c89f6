#!/usr/bin/env bash
# One-command GPU validation of medgrpo (issue 11): install the carried wheels, build, AOT-compile the
# Triton kernels, run the GPU test suite, a trainer smoke run and the kernel benchmarks; every stage
# recorded as it ends in $OUT/validate.json (plus validate.log, junit.xml, aot.json); a short table last.
#
#   bash bench/gpu/validate.sh             on the device machine (fresh and bare), in about 7.5 minutes
#   bash bench/gpu/validate.sh --dry-run   every stage on this CPU at tiny sizes (TRITON_INTERPRET=1)
#
# Extra arguments go to bench/gpu/stages.py (--budget-s S, --only stage,stage). Environment: OUT (default:
# a new temporary folder), PYTHON (default: python3; the dry run prefers .venv/bin/python when it exists),
# MEDGRPO_COMMIT (recorded as the commit where the tree has no .git, as on the device).
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY_RUN=0
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && DRY_RUN=1
done
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ]; then
        PYTHON=.venv/bin/python
    fi
fi
OUT="${OUT:-$(mktemp -d -t medgrpo-validate-out.XXXXXX)}"
if [ "$DRY_RUN" = 1 ]; then
    WORK="$(mktemp -d -t medgrpo-validate-work.XXXXXX)"
else
    WORK=/tmp/medgrpo-validate
    rm -rf "$WORK"
fi
mkdir -p "$OUT" "$WORK"

cat <<'EOF'
medgrpo GPU validation (bench/gpu/validate.sh; bench/README.md, "GPU validation").
  Here, once:   bash bench/gpu/fetch_wheels.sh     (liger-kernel into the git-ignored .whl/)
  The device:   run(command="MEDGRPO_COMMIT=<git rev-parse HEAD, written out> bash bench/gpu/validate.sh",
                    carry=[".whl"], timeout_s=540)
  Results:      $OUT/validate.json, validate.log, junit.xml, aot.json; then here
                python bench/gpu/report.py <files_at>/validate.json --readme bench/README.md
  CPU dry run:  PYTHON=<venv python> bash bench/gpu/validate.sh --dry-run
EOF
echo "OUT=$OUT WORK=$WORK PYTHON=$PYTHON ($("$PYTHON" --version 2>&1))"

args=(--out "$OUT" --work "$WORK")
for arg in "$@"; do
    args+=("$arg")
done
PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu/stages.py "${args[@]}"
status=$?
if [ "$DRY_RUN" = 1 ] && [ -z "${KEEP_WORK:-}" ]; then
    rm -rf "$WORK"
fi
exit "$status"
