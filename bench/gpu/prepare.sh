#!/usr/bin/env bash
# Prepare the GPU check (bench/gpu/run.sh) HERE, where the package registry is reachable: download
# the wheels of dcf's runtime requirements (pyproject.toml [project].dependencies, and everything they
# need) for the device machine's platform (x86-64 Linux, CPython 3.12) into bench/gpu/wheels/, which
# git ignores and the device call carries (carry: ["bench/gpu/wheels"]).
#
#   bash bench/gpu/prepare.sh            # about 12 MB, a few seconds
#
# Left out (the device image has them; see /work/.library/device/KINDS.md): torch and its CUDA
# libraries (no dcf requirement names them), and numpy (16 MB, and torch there is built against the
# image's own). Everything else is carried even where the image has some version of it, so the
# versions that run there are the ones resolved here. run.sh installs them with --no-deps into
# /tmp/dcf-site, ahead of the image's site-packages on PYTHONPATH, and checks every requirement.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WHEELS=${DCF_GPU_WHEELS:-$HERE/wheels}
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
#: the device image provides these; never carry them (names as pip normalises them, lower case)
SKIP_RE='^(numpy|torch|triton|nvidia_.*|cuda_.*)-'
#: the most the wheels may take: the working tree (about 5 MB) and the wheels travel within 64 MiB
MAX_MB=40

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mapfile -t REQS < <("$PY" "$HERE/deps.py" requirements)
echo "prepare: ${#REQS[@]} requirements from pyproject.toml: ${REQS[*]}"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/dcf-wheels.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
# one resolution for the device's Python and platform: the requirements and all they need
"$PY" -m pip download -q --disable-pip-version-check "${PLATFORM[@]}" -d "$STAGE" "${REQS[@]}"

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
kept=0 skipped=()
for whl in "$STAGE"/*.whl; do
    base=$(basename "$whl")
    if [[ ${base,,} =~ $SKIP_RE ]]; then skipped+=("$base"); continue; fi
    mv "$whl" "$WHEELS/"
    kept=$((kept + 1))
done
others=$(find "$STAGE" -mindepth 1 -maxdepth 1 ! -name '*.whl')
if [[ -n $others ]]; then echo "prepare: pip left something that is not a wheel: $others" >&2; exit 1; fi
# one version of each (two stop the install there)
dups=$(ls "$WHEELS" | sed 's/-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n $dups ]]; then echo "prepare: two versions of: $dups" >&2; exit 1; fi
ls "$WHEELS" >"$WHEELS/MANIFEST.txt"

size_kb=$(du -sk "$WHEELS" | cut -f1)
echo "prepare: $kept wheels in ${WHEELS#"$ROOT"/} ($((size_kb / 1024)) MiB, ${size_kb} KiB); left out (the image has them): ${skipped[*]:-none}"
if ((size_kb > MAX_MB * 1024)); then
    echo "prepare: the wheels take more than $MAX_MB MiB: they and the working tree must travel within 64 MiB" >&2
    exit 1
fi
if git -C "$ROOT" ls-files --error-unmatch "${WHEELS#"$ROOT"/}" >/dev/null 2>&1 \
        || ! git -C "$ROOT" check-ignore -q "$WHEELS/MANIFEST.txt"; then
    echo "prepare: warning: ${WHEELS#"$ROOT"/} is not ignored by git; carry travels ignored paths only" >&2
fi
echo "prepare: done. Device call: run(command='bash bench/gpu/run.sh', carry=['bench/gpu/wheels'], timeout_s=480)"
