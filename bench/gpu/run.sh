#!/usr/bin/env bash
# The GPU check, in ONE device call (docs/DEPLOYMENT.md, "GPU check"). Prepare here first:
#
#   bash bench/gpu/prepare.sh                      # the wheels, into bench/gpu/wheels (git ignores it)
#   device run: command "bash bench/gpu/run.sh", carry ["bench/gpu/wheels"], timeout_s 480
#   DCF_GPU_DRY=1 bash bench/gpu/run.sh            # the same stages here, on the CPU, small sizes
#
# Stages, each under its own timeout, all within DCF_GPU_BUDGET_S (440 s): env, install (the carried
# wheels into /tmp/dcf-site, --no-deps), deps (every pyproject requirement importable and new enough),
# pytest-gpu (pytest -m gpu over the files that use the marker; on a GPU none may skip), matmul (dcf's
# Client.matmul on one CUDA provider against torch's own, n = 8192 and 16384, float32, transfers
# counted), train (2 CUDA providers: sync, then allreduce if the head takes it). A failed stage is
# reported and the next one runs; install and deps failing stop the run. Everything printed also
# goes to $OUT/run.log (bench/results/gpu-DATE/ where OUT is unset); figures in $OUT/*.json,
# the clusters' logs in $OUT/cluster-logs.tar.gz, the labelled figures in $OUT/summary.txt.
set -euo pipefail

if [[ ${1:-} == --step ]]; then STEP=$2; else STEP=""; fi
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
HERE=$(dirname "$SELF")
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"

# ---- one stage, run by the main part below as: bash run.sh --step NAME (under timeout) ----------
step_env() {
    echo "host: $(uname -srm), $(nproc) cores, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB memory"}')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, \
CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")'
}

step_install() {
    local wheels=("$WHEELS"/*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        echo "no wheels in ${WHEELS#"$ROOT"/}: run bash bench/gpu/prepare.sh here and carry bench/gpu/wheels"
        return 1
    fi
    local flags=(-q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade)
    if [[ $DRY == 1 ]]; then  # the device's Python and platform, into a scratch folder: the set installs
        flags+=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
                --platform manylinux_2_26_x86_64 --platform manylinux_2_5_x86_64)
    fi
    "$PY" -m pip install "${flags[@]}" --target "$SITE" "${wheels[@]}"
    echo "installed ${#wheels[@]} wheels into $SITE ($(du -sm "$SITE" | cut -f1) MB)$([[ $DRY == 1 ]] \
        && echo ' for Python 3.12 (dry run: not used here)')"
}

step_deps() {
    "$PY" "$HERE/deps.py" check
}

step_pytest_gpu() {
    local files
    mapfile -t files < <(grep -rlE 'mark\.gpu\b' tests --include='*.py' | sort)
    echo "files using the gpu marker: ${files[*]}"
    local log=$WORK/pytest-gpu.txt rc=0
    "$PY" -m pytest -m gpu -p no:cacheprovider -rA -q --junitxml="$OUT/pytest-gpu.xml" "${files[@]}" 2>&1 \
        | tee "$log" || rc=$?
    local skipped passed
    skipped=$(grep -c '^SKIPPED' "$log" || true)
    passed=$(grep -c '^PASSED' "$log" || true)
    echo "[pytest-gpu] PASSED $passed, SKIPPED $skipped (pytest exit $rc)"
    if ((rc != 0)); then return "$rc"; fi
    if [[ $DRY == 1 ]]; then echo "[pytest-gpu] dry run: the gpu tests skip without a GPU, as in CI"; return 0; fi
    # on a CUDA machine only the MPS-only test may skip; one skipped for want of a device is a failure
    if grep -E '^SKIPPED' "$log" | grep -qv 'needs MPS'; then
        echo "[pytest-gpu] FAILED: a gpu test skipped on a CUDA machine"
        return 1
    fi
    if ((passed == 0)); then echo "[pytest-gpu] FAILED: no gpu test passed"; return 1; fi
}

step_matmul() {
    "$PY" "$HERE/matmul_gpu.py" --device "$DEVICE" --sizes $SIZES --repeats 3 --budget-s 40 \
        --json "$OUT/matmul.json" --log-dir "$WORK/logs/matmul"
}

step_train() {
    "$PY" "$HERE/train_gpu.py" --device "$DEVICE" --providers 2 --modes sync allreduce --epochs "$EPOCHS" \
        --job-timeout 45 --json "$OUT/train.json" --log-dir "$WORK/logs/train"
}

if [[ -n $STEP ]]; then
    "step_${STEP//-/_}"
    exit
fi

# ---- the main part -----------------------------------------------------------------------------
export DRY=${DCF_GPU_DRY:-0}
BUDGET=${DCF_GPU_BUDGET_S:-440}
export WHEELS=${DCF_GPU_WHEELS:-$HERE/wheels}
export OUT=${OUT:-$ROOT/bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export WORK
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dcf-gpu.XXXXXX")
export PYTHONUNBUFFERED=1
if [[ $DRY == 1 ]]; then
    export PY=${DCF_GPU_PYTHON:-$ROOT/.venv/bin/python} DEVICE=cpu SIZES="256 1024" EPOCHS=1
    export SITE=$WORK/site-py312 PYTHONPATH=$ROOT
else
    export PY=${DCF_GPU_PYTHON:-python3} DEVICE=cuda SIZES="8192 16384" EPOCHS=3
    export SITE=/tmp/dcf-site PYTHONPATH=/tmp/dcf-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

exec > >(tee "$OUT/run.log") 2>&1
TEE_PID=$!
START=$SECONDS
SUMMARY=()

stage() {  # stage NAME SECONDS: run step NAME under a timeout that also fits what is left of the budget
    local name=$1 want=$2 left limit t0 rc=0 status
    left=$((START + BUDGET - SECONDS))
    limit=$((want < left ? want : left))
    if ((limit < 10)); then
        echo "== $name: SKIPPED (${left}s of the ${BUDGET}s budget left)"
        SUMMARY+=("$name: SKIPPED (budget spent)")
        return 1
    fi
    echo
    echo "== $name (timeout ${limit}s, $((SECONDS - START))s into the run) =="
    t0=$SECONDS
    timeout -k 10 "$limit" bash "$SELF" --step "$name" || rc=$?
    if ((rc == 0)); then status=ok
    elif ((rc == 124 || rc == 137)); then status="TIMED OUT after ${limit}s"
    else status="FAILED (exit $rc)"; fi
    echo "== $name: $status in $((SECONDS - t0))s"
    SUMMARY+=("$name: $status in $((SECONDS - t0))s")
    return "$rc"
}

finish() {
    local figures
    echo
    echo "== summary ($([[ $DRY == 1 ]] && echo 'DRY RUN on the CPU, small sizes' || echo 'GPU'), $((SECONDS - START))s) =="
    printf '%s\n' "${SUMMARY[@]}"
    figures=$(grep -E '^\[(matmul|train|pytest-gpu)\] ' "$OUT/run.log" | grep -E 'RATIO|torch:|Client.matmul:|STEP|not available|FAILED|TIMED OUT|PASSED [0-9]' || true)
    echo "${figures:-no figures}"
    { printf '%s\n' "${SUMMARY[@]}"; echo "${figures:-no figures}"; } >"$OUT/summary.txt"
    if [[ -d $WORK/logs ]]; then tar -czf "$OUT/cluster-logs.tar.gz" -C "$WORK" logs; fi
    echo "output in ${OUT}: $(cd "$OUT" && echo *)"
}

echo "dcf GPU check: $([[ $DRY == 1 ]] && echo "DRY RUN (DCF_GPU_DRY=1): CPU, n = $SIZES" \
    || echo "CUDA, n = $SIZES"); python $PY; budget ${BUDGET}s; output in $OUT"
ok=1
stage env 20 || true
stage install 60 || ok=0
if ((ok)); then stage deps 45 || ok=0; fi
if ((ok)); then
    stage pytest-gpu 90 || true
    stage matmul 150 || true
    stage train 110 || true
else
    SUMMARY+=("pytest-gpu, matmul, train: not run (install or deps failed)")
fi
finish
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || true
