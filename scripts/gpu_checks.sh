#!/usr/bin/env bash
# All GPU checks of the relation kernels in one call (issue 4), for a machine with a CUDA GPU.
#
#   scripts/gpu_checks.sh [OUT_DIR]        (default: $OUT, else runs/gpu_checks)
#   GPU_CHECKS_QUICK=1 scripts/gpu_checks.sh   # benchmark keep 100%/34% only
#   GPU_CHECKS_BUDGET=560                       # seconds for all steps (default 560: fits a 10-minute call)
#
# Runs from the repository root, needs torch + triton + timm + pytest only (no deepspeed/open_clip), and fits in
# ten minutes: (1) device and versions, (2) the GPU kernel tests in bf16/fp16/fp32 on the compiled kernels
# (tests/test_kernels_gpu.py, marked `gpu`), (3) `python -m kernels.bench` at B=128, (4) the CPU kernel tests
# (interpreter, Hopper AOT compile, reference, dispatch) on that machine's Triton, (5) the training throughput
# benchmark. Writes to OUT_DIR four files (the device tool returns at most eight): results.md (the summary
# tables), bench.json, train.json and logs.tar.gz (env.txt, every step's log and JUnit XML).
# Exit status: non-zero if any step failed (every step still runs).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
out="${1:-${OUT:-runs/gpu_checks}}"
mkdir -p "$out"
status=0
budget=${GPU_CHECKS_BUDGET:-560}  # seconds for all steps; the summary is written after them
limit() {  # limit WANTED -> min(WANTED, what is left of the budget), at least 10
    local left=$((budget - SECONDS))
    local want=$1
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 10 ] && want=10
    echo "$want"
}
pytest_args=(-q -p no:cacheprovider --noconftest -o addopts="" -rfEs)

step() {  # step NAME TIMEOUT_S LOG CMD...   (output to the terminal and to LOG)
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=TERM "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
    return 0
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    python - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}  cuda {torch.version.cuda}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# Most important first; each step gets at most what is left of the budget (the device tool allows 600 s).
step "GPU kernel tests" "$(limit 200)" "$out/tests_gpu.txt" python -m pytest "${pytest_args[@]}" -m gpu \
    tests/test_kernels_gpu.py --junitxml="$out/tests_gpu.xml"
bench_args=(--out "$out/bench.json")
[ "${GPU_CHECKS_QUICK:-0}" = 1 ] && bench_args+=(--quick)
step "benchmark" "$(limit 270)" "$out/bench.txt" python -m kernels.bench "${bench_args[@]}"
step "CPU kernel tests" "$(limit 200)" "$out/tests_cpu.txt" python -m pytest "${pytest_args[@]}" \
    tests/test_kernels_reference.py tests/test_kernels_interpret.py tests/test_kernels_compile.py \
    --junitxml="$out/tests_cpu.xml"

python - "$out" <<'EOF' || status=1
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
lines = ["# Relation kernel GPU checks", "", "```", (out / "env.txt").read_text().strip(), "```", "",
         "| tests | passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|---|"]
for name in ("tests_gpu", "tests_cpu"):
    path = out / f"{name}.xml"
    if not path.exists():
        lines.append(f"| {name} | - | - | - | - | (no report: timed out or crashed) |")
        continue
    root = ET.parse(path).getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    lines.append(f"| {name} | {n - f - e - k} | {f} | {e} | {k} | {float(s.get('time', 0)):.0f} |")
bench = out / "bench.json"
if bench.exists():
    from kernels.bench import table

    r = json.loads(bench.read_text())
    c = r["ceilings"]
    lines += ["", f"Benchmark: `{r['command']}` on {r['device']}, {r['date']}, torch {r['torch']}, triton {r['triton']}.",
              f"Ceilings measured in the same run: copy {c['copy_gbps'] or 0:.0f} GB/s, "
              f"bf16 matmul {c['bf16_tflops'] or 0:.0f} TFLOP/s. FLOPs: {r['flop_model']}."
              + ("" if r.get("complete") else " PARTIAL: the benchmark stopped early (time limit or crash)."), "",
              table(r["rows"], ["eager", "compile", "triton", "triton_det"])]
else:
    lines += ["", "Benchmark: no bench.json (timed out or failed; see bench.txt)."]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
# (5) Training throughput (benchmarks/train_throughput.py, docs/performance.md): one step without DeepSpeed for
# the ViT-B (MAE-B + DeiT-B, B=128) and ViT-L (MAE-L + timm's CLIP-L/14, B=64) recipes, random weights, fast vs
# naive. It starts no variant once its own budget is spent and rewrites train.json after each variant.
train_limit=$(limit 150)
step "training benchmark" "$train_limit" "$out/train.txt" python benchmarks/train_throughput.py \
    --preset vitb_in1k_deit_mae,vitl_in21k_clip_mae --batch 128,64 --steps 10 --warmup 3 --variants fast,naive \
    --time-budget $((train_limit > 70 ? train_limit - 50 : 20)) --out "$out/train.json"
if [ -f "$out/train.json" ]; then
    { printf '\n## Training throughput\n\n'; python benchmarks/train_throughput.py --table "$out/train.json"; } \
        >> "$out/results.md" || status=1
fi
# Bundle the logs: few files come back from the device machine.
logs=()
for f in "$out"/*.txt "$out"/*.xml; do [ -e "$f" ] && logs+=("$(basename "$f")"); done
if [ "${#logs[@]}" -gt 0 ]; then
    tar -czf "$out/logs.tar.gz" -C "$out" "${logs[@]}" && (cd "$out" && rm -f "${logs[@]}")
fi
echo "results in $out (status $status)"
exit $status
