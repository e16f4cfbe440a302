#!/usr/bin/env bash
# The GPU check: the one script that a lent GPU machine runs (benchmarks/README.md has
# the exact `device` call), and that this machine rehearses with --device cpu.
#
#   1. install   the carried wheels (.whl/, from benchmarks/prepare_gpu_wheels.sh) into
#                /tmp/site, offline: --no-index --no-deps; nothing else is installed
#   2. env       torch / CUDA / GPU / free memory, and which packages import from where
#   3. smoke     benchmarks/cuda_smoke.py: every training path on the tiny model
#   4. flux      benchmarks/train_step.py --flux --in-process: the FLUX.1-dev architecture
#                at 1024 (random weights made on the GPU): phase 1 as auto picks it, LoRA
#                phase 2 fast and --memory low, one image at 28 steps
#   5. steps     the same for SD2.1-base: steps and generation, beside the original-style
#                baseline, all in one process (same machine)
#   6. sdxl      the same for the SDXL base architecture at 1024: phase 1 as auto picks
#                it, LoRA phase 2 (fast and --memory low) and generation
#   7. compile   the smoke test's torch.compile variants (the step; the whole step under CUDA
#                graphs, the update compiled too): the slowest to start
#   8. compiled  SD2.1-base steps with the whole step compiled (learn --compile), beside
#                the plain rows of part 5
#   9. wall      benchmarks/learn_wall.py: `learn` from the command to the scene written on
#                SD2.1-base (100+100 steps, extrapolated to 400+400), plain, --compile with
#                a cold compile cache, and again with it warm
#  10. sdxl-compiled  SDXL at 1024: LoRA phase 2 with the whole step compiled (issue 22's
#                SDXL target, LoRA <= 0.5 s), beside part 6's plain row
#  11. profile   benchmarks/step_profile.py: where SD2.1-base's step time goes (phases 1
#                and 2, LoRA, the baseline) under torch.profiler: GPU busy share, kernels,
#                launches and syncs per step, the top kernels and operations
#
# Each part runs under its own `timeout`, capped by what is left of the whole budget
# (GPU_CHECK_BUDGET_S, default 540 s; 1500 s for the dry run on the CPU), so one hang
# cannot eat the rest; a part that fails is logged and the next one runs. Every result
# is appended to $OUT/gpu_check.jsonl as soon as it is known, everything printed goes
# to $OUT/gpu_check.log, and the step tables are written to
# $OUT/train_step-<device>[-sdxl|-flux].{md,json} after every row.
#
#     bash benchmarks/gpu_check.sh                        # on the GPU machine (the device call)
#     OUT=/tmp/gc bash benchmarks/gpu_check.sh --device cpu   # the dry run here: tiny sizes, minutes
#     bash benchmarks/gpu_check.sh --parts "install env smoke" --smoke-args "--only fast-fp32"
#     GPU_CHECK_BUDGET_S=240 bash benchmarks/gpu_check.sh --parts "install env compiled"   # a second call (benchmarks/README.md)
set -uo pipefail  # no -e: each part is guarded on its own
cd "$(dirname "$0")/.."
ROOT=$PWD

DEVICE=${GPU_CHECK_DEVICE:-cuda}
PARTS=${GPU_CHECK_PARTS:-install env smoke flux steps sdxl compile compiled wall sdxl-compiled profile}
SMOKE_ARGS=${GPU_CHECK_SMOKE_ARGS:-}
while (( $# )); do
    case $1 in
        --device) DEVICE=$2; shift 2 ;;
        --parts) PARTS=$2; shift 2 ;;
        --smoke-args) SMOKE_ARGS=$2; shift 2 ;;
        *) echo "usage: $0 [--device cuda|cpu] [--parts 'install env smoke flux steps sdxl compile compiled wall sdxl-compiled profile'] [--smoke-args ARGS]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-$([[ $DEVICE == cuda* ]] && echo 540 || echo 1500)}
SITE=${GPU_CHECK_SITE:-/tmp/site}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
JSONL=$OUT/gpu_check.jsonl
exec > >(tee -a "$LOG") 2>&1
TEE=$!

# Sizes: the real thing on CUDA; on the CPU, the same parts at tiny sizes.
if [[ $DEVICE == cuda* ]]; then
    STEP_ARGS=(--steps 10 --gen-steps 10)
    SDXL_ARGS=(--steps 5 --gen-steps 5)
    FLUX_ARGS=(--steps 3 --gen-steps 3)
    # Measured on an H200: install 1 s, env 22, smoke 89 (before FLUX's 6 variants), steps
    # 115 (12 rows; now 19), sdxl 115; flux is expected at ~1.5 min; compile gets whatever is left.
    WALL_ARGS=(--steps1 100 --steps2 100)
    PROFILE_ARGS=(--steps 5 --profile-steps 3)
    CAPS=(install=90 env=60 smoke=210 steps=240 sdxl=150 flux=150 compile=240 compiled=300 wall=360 sdxl-compiled=300 profile=180)
else
    STEP_ARGS=(--tiny --steps 2 --gen-steps 2)
    SDXL_ARGS=(--tiny --steps 2 --gen-steps 2)
    FLUX_ARGS=(--tiny --steps 2 --gen-steps 2)
    WALL_ARGS=(--tiny --steps1 3 --steps2 3 --runs cache plain)  # a compile takes minutes on the CPU
    PROFILE_ARGS=(--tiny --steps 1 --profile-steps 2)
    CAPS=(install=90 env=60 smoke=300 steps=200 sdxl=120 flux=120 compile=330 compiled=900 wall=150 sdxl-compiled=300 profile=120)  # compiled: ~90 s a row here on one busy core, cold
fi

# Offline, from the checkout: src/ for scenebreak, tests/ for the tiny model builders.
export PYTHONPATH=$ROOT/src:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SCENEBREAK_HOME=${SCENEBREAK_HOME:-$(mktemp -d /tmp/scenebreak-home.XXXXXX)}
export GPU_CHECK_DEVICE=$DEVICE GPU_CHECK_SMOKE_ARGS=$SMOKE_ARGS

START=$SECONDS
FAILED=()
note() {  # note PART KEY=VALUE...: one JSON line for a part's outcome
    "$PY" -c 'import json, sys; v = lambda s: json.loads(s) if s in ("true", "false", "null") or s.isdigit() else s
print(json.dumps({"part": "gpu_check", "step": sys.argv[1], **{k: v(x) for k, x in (a.split("=", 1) for a in sys.argv[2:])}}))' "$@" >>"$JSONL"
}
cap() { local c; for c in "${CAPS[@]}"; do [[ ${c%%=*} == "$1" ]] && echo "${c#*=}"; done; }
part() {  # part NAME COMMAND...: run under the smaller of its cap and what is left
    local name=$1; shift
    [[ " $PARTS " == *" $name "* ]] || return 0
    local left=$(( BUDGET - (SECONDS - START) )) limit
    limit=$(cap "$name"); (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "=== $name: skipped, ${left}s left of the ${BUDGET}s budget"
        note "$name" ok=null status="skipped: out of time (${left}s left)"
        return 0
    fi
    echo "=== $name ($(date +%T), limit ${limit}s, ${left}s left)"
    local t0=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    local took=$(( SECONDS - t0 )) status
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed: exit $rc" ;;
    esac
    echo "=== $name: $status (${took}s)"
    (( rc == 0 )) || FAILED+=("$name")
    note "$name" ok="$([[ $rc == 0 ]] && echo true || echo false)" status="$status" seconds="$took" rc="$rc"
}

echo "gpu_check: device $DEVICE, parts: $PARTS; budget ${BUDGET}s; OUT=$OUT; $(date -u +%FT%TZ)"
echo "checkout: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')$(git status --porcelain 2>/dev/null | grep -q . && echo ' + uncommitted changes')"
shopt -s nullglob; WHEELS=(.whl/*.whl); shopt -u nullglob
if (( ${#WHEELS[@]} )); then
    ls -l "${WHEELS[@]}"
    part install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}"
elif [[ " $PARTS " == *" install "* ]]; then
    echo "=== install: no .whl/*.whl (run benchmarks/prepare_gpu_wheels.sh here and carry .whl): nothing installed"
    note install ok=null status="skipped: no .whl/*.whl"
fi
[[ -d $SITE ]] && export PYTHONPATH=$PYTHONPATH:$SITE

part env "$PY" - "$JSONL" <<'EOF'
import importlib, json, os, platform, sys
info = {"part": "env", "python": sys.version.split()[0], "platform": platform.platform(), "device": os.environ["GPU_CHECK_DEVICE"]}
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    d = torch.device("cuda:0")
    free, total = torch.cuda.mem_get_info(d)
    info.update(gpu=torch.cuda.get_device_name(d), capability=".".join(map(str, torch.cuda.get_device_capability(d))),
                gpus=torch.cuda.device_count(), free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1),
                bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
packages = {}
for name in ("scenebreak", "diffusers", "transformers", "accelerate", "huggingface_hub", "safetensors", "tokenizers", "peft",
             "platformdirs", "bitsandbytes", "triton", "numpy", "PIL", "click", "rich", "psutil"):
    try:
        module = importlib.import_module(name)
        packages[name] = f"{getattr(module, '__version__', '?')} ({os.path.dirname(module.__file__)})"
    except Exception as error:  # ImportError, or a native library that fails to load
        packages[name] = f"NOT IMPORTABLE: {type(error).__name__}: {error}"[:300]
info["packages"] = packages
if torch.cuda.is_available() and "NOT" not in packages["bitsandbytes"]:
    try:  # the native CUDA library loads and steps
        import bitsandbytes as bnb
        p = torch.nn.Parameter(torch.ones(4096, device="cuda"))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p]).step()
        info["bitsandbytes_8bit_step"] = "ok"
    except Exception as error:
        info["bitsandbytes_8bit_step"] = f"{type(error).__name__}: {error}"[:300]
print(json.dumps(info, indent=1))
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(info) + "\n")
EOF

# shellcheck disable=SC2086  # SMOKE_ARGS is a list of words
part smoke "$PY" benchmarks/cuda_smoke.py --device "$DEVICE" --jsonl "$JSONL" $SMOKE_ARGS
# FLUX before SD2.1's and SDXL's steps: their figures exist from earlier GPU checks, FLUX's not.
part flux "$PY" benchmarks/train_step.py --flux --device "$DEVICE" --in-process "${FLUX_ARGS[@]}" --results-dir "$OUT" --jsonl "$JSONL"
part steps "$PY" benchmarks/train_step.py --device "$DEVICE" --in-process "${STEP_ARGS[@]}" --results-dir "$OUT" --jsonl "$JSONL"
part sdxl "$PY" benchmarks/train_step.py --sdxl --device "$DEVICE" --in-process "${SDXL_ARGS[@]}" --results-dir "$OUT" --jsonl "$JSONL"
part compile "$PY" benchmarks/cuda_smoke.py --device "$DEVICE" --jsonl "$JSONL" --only compile compile-whole
# shellcheck disable=SC2086  # the words of GPU_CHECK_COMPILED_ONLY are --only's
part compiled "$PY" benchmarks/train_step.py --compiled --only ${GPU_CHECK_COMPILED_ONLY:-compiled} --device "$DEVICE" --in-process "${STEP_ARGS[@]}" --results-dir "$OUT" --jsonl "$JSONL"
part wall "$PY" benchmarks/learn_wall.py --device "$DEVICE" "${WALL_ARGS[@]}" --results-dir "$OUT" --jsonl "$JSONL"
part sdxl-compiled "$PY" benchmarks/train_step.py --sdxl --compiled --only "LoRA compiled" --device "$DEVICE" --in-process "${SDXL_ARGS[@]}" --results-dir "$OUT" --jsonl "$JSONL"
part profile "$PY" benchmarks/step_profile.py --device "$DEVICE" "${PROFILE_ARGS[@]}" --results-dir "$OUT" --jsonl "$JSONL"

echo "=== summary ($(( SECONDS - START ))s)"
"$PY" - "$JSONL" <<'EOF'
import json, os, sys
sys.path.insert(0, "benchmarks")
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
for r in rows:
    if r["part"] == "env":
        print("env:", r.get("gpu", "no GPU"), r.get("capability", ""), "torch", r["torch"], "cuda", r["torch_cuda"],
              "| bitsandbytes:", r["packages"]["bitsandbytes"].split(" (")[0], r.get("bitsandbytes_8bit_step", ""))
    elif r["part"] == "smoke":
        state = "skipped: " + r["skipped"] if r.get("skipped") else ("ok" if r["ok"] else "FAILED: " + r.get("error", ""))
        extra = {k: r[k] for k in ("seconds", "peak_gib", "plan", "max_diff_weights", "resumed_at") if k in r}
        print(f"smoke {r['variant']:14} {state} {extra}")
    elif r["part"] == "train_step":
        table = r.get("table", "train_step").removeprefix("train_step-").split("-", 1)
        model = table[1] if len(table) > 1 else "sd21"  # sdxl, flux (-tiny on the dry run)
        what = r.get("error") or (f"{r['s_per_image']:.2f} s/image" if r["phase"] == "generate" else f"{r['s_per_step']:.3f} s/step")
        steps_peak = f" (steps {r['steps_peak_gib']:.1f}, set-up {r['setup_peak_gib']:.1f})" if "steps_peak_gib" in r else ""
        print(f"steps {model:10} {str(r['phase']):8} {r['kind']:28} {what} peak {r.get('peak_gib', 0):.1f} GiB{steps_peak}")
    elif r["part"] == "profile":
        p = r.get("profile", {})
        busy = (f"GPU busy {p['device_busy_ms_per_step']:.1f} ms ({p['device_busy_ms_per_step'] / 1000 / r['s_per_step']:.0%}), "
                f"{p['kernels_per_step']:.0f} kernels, {p['host_syncs_per_step']:.1f} syncs" if "device_busy_ms_per_step" in p else "")
        what = r.get("error") or f"{r['s_per_step']:.3f} s/step, {p['aten_ops_per_step']:.0f} ops; {busy}"
        print(f"profile {str(r['phase']):3} {r['kind']:24} {what}")
    elif r["part"] == "learn_wall":
        what = (f"wall {r['wall_s']:.1f} s, 400+400 {r['est_400_400_s']:.1f} s" if r.get("est_400_400_s")
                else f"wall {r['wall_s']:.1f} s" + ("" if r["ok"] else " FAILED"))
        print(f"wall  {r['run']:14} {r['steps1']}+{r['steps2']} {what}")
    else:
        print(f"part  {r.get('step', r['part']):14} {r.get('status')} ({r.get('seconds', '?')} s)")
try:
    from cuda_smoke import DEFAULT_SKIP, VARIANTS
    seen = {r["variant"] for r in rows if r["part"] == "smoke"}
    ran = {r.get("step") for r in rows if r["part"] == "gpu_check"}
    missing = [v for v in VARIANTS if v not in seen and (v not in DEFAULT_SKIP or "compile" in ran)]
    if missing and "smoke" in ran and not os.environ.get("GPU_CHECK_SMOKE_ARGS"):
        print("smoke variants with no result (not reached, or their process died):", " ".join(missing))
except Exception as error:
    print("summary:", error)
EOF
ls -l "$OUT"
echo "gpu_check: ${#FAILED[@]} part(s) failed${FAILED[*]:+: ${FAILED[*]}}"
exec >&- 2>&-
wait "$TEE"  # the log is complete before the files go back
(( ${#FAILED[@]} == 0 ))
