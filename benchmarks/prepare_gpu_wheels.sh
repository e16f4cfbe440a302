#!/usr/bin/env bash
# Download, on this machine, the wheels the lent GPU machine's image lacks into .whl/
# (git-ignored; the device call names it in `carry`). That image has Python 3.12,
# torch 2.11 (CUDA 13.0), transformers, accelerate, huggingface_hub, safetensors,
# peft, click, rich, psutil, pillow, numpy, filelock, regex, requests and packaging,
# but not diffusers, platformdirs or bitsandbytes, and it cannot download anything.
#
#     bash benchmarks/prepare_gpu_wheels.sh          # then the device call in benchmarks/README.md
#
# Exact versions, no dependencies (each wheel's own Requires-Dist is printed below
# and checked against the image): diffusers and platformdirs as in the development
# venv; bitsandbytes 0.50.2 ships a CUDA 13.0 library (libbitsandbytes_cuda130.so)
# and needs only torch>=2.4, numpy and packaging; diffusers 0.42.1 needs
# huggingface-hub>=1.32 and safetensors>=0.8 (the image has 1.33.0 and 0.8.0). Everything that travels with the
# call must stay under 64 MiB: this fails loudly above 60 MiB of wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 platformdirs==4.14.8 bitsandbytes==0.50.2)
LIMIT_MIB=60
# What the GPU image already has (from the device tool's package list), for the check below.
IMAGE_HAS=" torch numpy packaging filelock regex requests safetensors pillow huggingface-hub huggingface_hub "

rm -rf .whl  # two versions of one package would stop the whole install there
mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

missing=0
for wheel in .whl/*.whl; do
    printf '%-60s %6.1f MiB\n' "$(basename "$wheel")" "$(stat -c %s "$wheel" | awk '{print $1 / 1048576}')"
    while read -r requirement; do
        name=$(echo "$requirement" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z' 'a-z')
        case "$requirement" in *"extra =="*) continue ;; esac
        if [[ "$IMAGE_HAS" == *" $name "* ]]; then
            echo "    needs $name: in the image"
        elif [[ "$name" == importlib_metadata || "$name" == importlib-metadata ]]; then
            echo "    needs $name: imported only on Python < 3.8 (diffusers/utils/import_utils.py); the image has 3.12"
        else
            echo "    needs $name: NOT in the image and not carried" >&2
            missing=1
        fi
    done < <(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist:' || true)
done

total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z -c -o --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
printf 'wheels: %.1f MiB; with the working tree that travels: %.1f MiB (limit 64 MiB)\n' \
    "$(awk "BEGIN {print $total / 1048576}")" "$(awk "BEGIN {print ($total + $tree) / 1048576}")"
if (( total > LIMIT_MIB * 1048576 )); then
    echo "FAIL: the wheels are over ${LIMIT_MIB} MiB: leave bitsandbytes out (its 8-bit variants then report 'skipped')" >&2
    exit 1
fi
if (( missing )); then
    echo "FAIL: a wheel needs a package the GPU image lacks (above): add it to WHEELS" >&2
    exit 1
fi
