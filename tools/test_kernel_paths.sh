#!/usr/bin/env bash
# The test suite under each x86 kernel path ATen can take: AVX-512, AVX2 and the plain one.
# float32 results differ in their last bits between them, and CI may run on any; a path the
# CPU lacks falls back to the best it has (the line before each run says which one ran).
# Usage: bash tools/test_kernel_paths.sh [pytest arguments]   (default: tests)
# e.g.   OMP_NUM_THREADS=1 bash tools/test_kernel_paths.sh tests/test_optim.py
# Each run ends with its table of float errors against their tolerances (--error-margins).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- tests
failed=()
for path in avx512 avx2 default; do
    ran=$(ATEN_CPU_CAPABILITY=$path python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
    echo "=== ATEN_CPU_CAPABILITY=$path (torch runs $ran, ${OMP_NUM_THREADS:-default} threads)"
    ATEN_CPU_CAPABILITY=$path python -m pytest -q --error-margins "$@" || failed+=("$path")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed under: ${failed[*]}"
    exit 1
fi
echo "passed under avx512, avx2 and default"
