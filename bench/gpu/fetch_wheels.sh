#!/usr/bin/env bash
# Download the wheels the GPU validation installs on the device machine into .whl/ (git-ignored).
#
# The device image (Python 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, pytest,
# pytest-xdist, hypothesis, matplotlib, ...) lacks only what the GPU test suite and the
# benchmarks import beyond it:
#   liger-kernel  the peer tests (tests/ops/test_policy_loss_peers.py, test_fused_linear_policy_loss.py)
#                 and the `liger` provider of the head benchmark. Pure Python, needs only torch and triton.
# Not fetched: qwen-vl-utils, av and decord (only CPU tests and bench_video.py use them: none of the
# GPU suite), DALI, flash-attn and the MiniLM weights (too large; issue 11's stage 2).
#
# Usage (from the repository root, on a machine with a package registry):
#   bash bench/gpu/fetch_wheels.sh            # device wheels into .whl/
#   bash bench/gpu/fetch_wheels.sh --dry-run  # also the test runners the CPU dry run lacks, into .whl/dry-run/
set -euo pipefail
cd "$(dirname "$0")/../.."

# One line per package: name==version. liger-kernel is pinned to the version CI's tests compare against.
DEVICE_WHEELS=(
    "liger-kernel==0.8.5"
)
# On the device already; a CPU machine may lack them. Pure Python: any Python 3 runs them.
DRY_RUN_WHEELS=(
    "pytest-xdist==3.8.0"
    "execnet==2.1.2"
    "pytest-timeout==2.4.0"
)
PYTHON="${PYTHON:-python3}"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

download() {  # download DEST PACKAGE...: wheels for CPython 3.12 on manylinux x86-64, no dependencies
    local dest="$1"
    shift
    mkdir -p "$dest"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]/#/--platform=}" -d "$dest" "$@"
}

download .whl "${DEVICE_WHEELS[@]}"
if [ "${1:-}" = "--dry-run" ]; then
    download .whl/dry-run "${DRY_RUN_WHEELS[@]}"
fi
echo "wheels in .whl/ (the device installs .whl/*.whl; carry [\".whl\"]):"
ls -l .whl/*.whl
du -ch .whl/*.whl | tail -1
