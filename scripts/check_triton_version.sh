#!/bin/bash
# Run the CPU kernel tests (Hopper compilation, interpreter, task, reference) against another Triton release.
#
#   scripts/check_triton_version.sh 3.6.0            # the GPU image's Triton; the dev machine has 3.8
#   VENV=/tmp/triton-3.6.0 scripts/check_triton_version.sh 3.6.0 -x -k compile
#
# Builds (once) a virtual environment on top of the installed packages (torch, timm, this repository) with only
# `triton==VERSION` replaced, then runs pytest there; extra arguments go to pytest. Triton's interpreter before
# 3.7 calls int() on 1-element numpy arrays, which numpy >= 2.3 rejects, so older Tritons get numpy < 2.3 in
# the environment (the compiled path on a GPU does not use numpy).
set -euo pipefail

version="${1:?usage: $0 TRITON_VERSION [pytest args...]}"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-${TMPDIR:-/tmp}/hd-triton-$version}"
python="${PYTHON:-python}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install -q --no-deps "triton==$version"
    if "$venv/bin/python" - "$version" <<'EOF'
import sys
major, minor = (int(p) for p in sys.argv[1].split(".")[:2])
sys.exit(0 if (major, minor) < (3, 7) else 1)
EOF
    then
        "$venv/bin/python" -m pip install -q "numpy<2.3"
    fi
fi

"$venv/bin/python" -c 'import sys, triton; print(f"triton {triton.__version__} from {triton.__file__}"); \
sys.exit(triton.__version__ != sys.argv[1])' "$version"
cd "$repo"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernels_compile.py tests/test_kernels_interpret.py \
    tests/test_kernels_task.py tests/test_kernels_reference.py "$@"
