#!/usr/bin/env bash
# Run HERE (with internet to the package registries), from the repository root: downloads into .whl/
# (git-ignored) the wheels tokenmill needs on the lent GPU machine that its image lacks (Python 3.12,
# x86-64; the image has torch, triton, transformers, tokenizers, safetensors, numpy, httpx, pyyaml,
# prometheus-client, pytest, hypothesis: /work/.library/device/KINDS.md). The versions are the ones
# CI tests with. Then carry .whl in the device call (scripts/gpu/check.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_34 manylinux_2_31 manylinux_2_35 manylinux_2_39; do
  plat+=(--platform "${p}_x86_64")
done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 llguidance==1.9.1 openai==3.57.0 distro==1.9.0 jiter==0.19.0 \
  sniffio==1.3.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
du -sh .whl
ls .whl
