#!/usr/bin/env bash
# GPU checks in two stages, each one short device call (a lent GPU gives 15 minutes in all, start-up included).
#
#   scripts/gpu_checks.sh stage1 [OUT_DIR]   # <= 4 min on an H200: what must be known first
#   scripts/gpu_checks.sh stage2 [OUT_DIR]   # <= 5 min: everything else
#   OUT_DIR default: $OUT, else runs/gpu_checks/<stage>.  PYTHON (default python3) runs everything.
#
# stage1: (1) the GPU kernel tests (tests/test_kernels_gpu.py, marked `gpu`: bf16/fp16/fp32 on the compiled
#         Triton kernels, realistic shapes), (2) `python -m kernels.bench --quick` (4 shapes), (3) one ViT-B/16
#         training step, `fast` against `naive` (benchmarks/train_throughput.py, B=128).
# stage2: (1) ViT-L/16 (B=64) in every variant of benchmarks/train_throughput.py (fast, naive, no_drop,
#         fp32_teachers, eager_loss, compiled, grad_ckpt), (2) ViT-B at 448 px, keep 30% and 100%, with and
#         without activation checkpointing, (3) the full `python -m kernels.bench` with what time is left.
# The CPU-only checks (the kernel tests under the interpreter, the Hopper compile tests, the reference) need no
# GPU and are not run here: `python -m pytest tests/test_kernels_*.py` on any machine, and
# `scripts/check_triton_version.sh 3.6.0` for the GPU image's Triton.
#
# Without CUDA the same script is a dry run: every step runs, CPU-sized (the tiny preset, one step, the aot_eager
# backend for `compiled`; the kernel bench times its eager reference only; the GPU tests are collected and skipped),
# so both stages can be checked anywhere: `scripts/gpu_checks.sh stage1 /tmp/s1 && scripts/gpu_checks.sh stage2 /tmp/s2`.
#
# Each step runs under `timeout --signal=INT` (pytest and the benchmarks keep what they measured), within the
# stage's budget (GPU_CHECKS_BUDGET seconds; default 225 for stage1, 285 for stage2). At most five files come back
# in OUT_DIR: results.md (the summary tables), bench.json, train.json, train448.json (stage2) and logs.tar.gz
# (env.txt, every step's log and JUnit XML). Exit status: non-zero if any step failed (every step still runs).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
stage="${1:-}"
case "$stage" in
    stage1) default_budget=225 ;;
    stage2) default_budget=285 ;;
    *) echo "usage: $0 stage1|stage2 [OUT_DIR]" >&2; exit 2 ;;
esac
out="${2:-${OUT:-runs/gpu_checks/$stage}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
budget=${GPU_CHECKS_BUDGET:-$default_budget}
status=0
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    dry=0
else
    dry=1
fi

limit() {  # limit WANTED -> min(WANTED, what is left of the budget), at least 10
    local left=$((budget - SECONDS)) want=$1
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 10 ] && want=10
    echo "$want"
}

step() {  # step NAME TIMEOUT_S LOG CMD...   (output to the terminal and to LOG)
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
    return 0
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "stage $stage, budget ${budget}s, dry run: $dry"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$py" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
import timm
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}  timm {timm.__version__}  "
      f"cuda {torch.version.cuda}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (dry run)")
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

pytest_args=(-q -p no:cacheprovider --noconftest -o addopts="" -rfEs)
train=("$py" benchmarks/train_throughput.py --steps 10 --warmup 3)
if [ "$dry" = 1 ]; then  # CPU-sized stand-ins of the GPU runs
    train=("$py" benchmarks/train_throughput.py --steps 1 --warmup 1 --threads 2 --override run.compile_backend=aot_eager)
fi

if [ "$stage" = stage1 ]; then
    step "GPU kernel tests" "$(limit 100)" "$out/tests_gpu.txt" "$py" -m pytest "${pytest_args[@]}" -m gpu \
        tests/test_kernels_gpu.py --junitxml="$out/tests_gpu.xml"
    step "kernel benchmark --quick" "$(limit 60)" "$out/bench.txt" "$py" -m kernels.bench --quick --out "$out/bench.json"
    if [ "$dry" = 1 ]; then
        presets=(--preset tiny --batch 8)
    else
        presets=(--preset vitb_in1k_deit_mae --batch 128)
    fi
    step "training step ViT-B fast vs naive" "$(limit 90)" "$out/train.txt" "${train[@]}" "${presets[@]}" \
        --variants fast,naive --out "$out/train.json"
else
    if [ "$dry" = 1 ]; then
        vitl=(--preset tiny --batch 8)
        vitb448=(--preset tiny --batch 8 --override student.img_size=128)
    else
        vitl=(--preset vitl_in21k_clip_mae --batch 64)
        vitb448=(--preset vitb_in1k_deit_mae --batch 32 --override student.img_size=448)
    fi
    t=$(limit 170)
    step "training ViT-L, every variant" "$t" "$out/train.txt" "${train[@]}" "${vitl[@]}" --time-budget $((t - 40)) \
        --variants fast,naive,no_drop,fp32_teachers,eager_loss,grad_ckpt,compiled --out "$out/train.json"
    t=$(limit 60)
    step "training ViT-B 448 px" "$t" "$out/train448.txt" "${train[@]}" "${vitb448[@]}" --time-budget $((t - 25)) \
        --variants fast,no_drop,grad_ckpt --out "$out/train448.json"
    step "kernel benchmark (all shapes)" "$(limit 120)" "$out/bench.txt" "$py" -m kernels.bench --out "$out/bench.json"
fi

"$py" - "$out" "$stage" <<'EOF' || status=1
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, stage = Path(sys.argv[1]), sys.argv[2]
lines = [f"# GPU checks, {stage}", "", "```", (out / "env.txt").read_text().strip(), "```", ""]
junit = out / "tests_gpu.xml"
if stage == "stage1":
    lines += ["| tests | passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|---|"]
    if junit.exists():
        root = ET.parse(junit).getroot()
        s = root if root.tag == "testsuite" else root.find("testsuite")
        n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
        lines.append(f"| GPU kernel tests | {n - f - e - k} | {f} | {e} | {k} | {float(s.get('time', 0)):.0f} |")
    else:
        lines.append("| GPU kernel tests | - | - | - | - | (no report: timed out or crashed) |")
bench = out / "bench.json"
if bench.exists():
    from kernels.bench import table

    r = json.loads(bench.read_text())
    c = r.get("ceilings") or {}
    lines += ["", f"Kernel benchmark: `{r.get('command')}` on {r.get('device')}, {r.get('date')}, torch "
              f"{r.get('torch')}, triton {r.get('triton')}. Ceilings: copy {c.get('copy_gbps') or 0:.0f} GB/s, bf16 "
              f"matmul {c.get('bf16_tflops') or 0:.0f} TFLOP/s."
              + ("" if r.get("complete") else " PARTIAL: stopped early (time limit or crash)."), ""]
    try:
        lines.append(table(r["rows"]))
    except TypeError:  # kernels.bench before its 4-shape --quick: table(rows, impls)
        lines.append(table(r["rows"], ["eager", "compile", "triton", "triton_det"]))
else:
    lines += ["", "Kernel benchmark: no bench.json (timed out or failed; see bench.txt in logs.tar.gz)."]
sys.path.insert(0, "benchmarks")
from train_throughput import summary

for name in ("train.json",) if stage == "stage1" else ("train.json", "train448.json"):
    path = out / name
    lines += ["", f"## Training throughput ({name})", ""]
    lines.append(summary(json.loads(path.read_text())) if path.exists() else "no report (timed out or failed)")
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# Bundle the logs: few files come back from the device machine.
logs=()
for f in "$out"/*.txt "$out"/*.xml; do [ -e "$f" ] && logs+=("$(basename "$f")"); done
if [ "${#logs[@]}" -gt 0 ]; then
    tar -czf "$out/logs.tar.gz" -C "$out" "${logs[@]}" && (cd "$out" && rm -f "${logs[@]}")
fi
echo "results in $out (status $status, ${SECONDS}s)"
exit $status
