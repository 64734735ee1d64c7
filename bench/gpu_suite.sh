#!/usr/bin/env bash
# The GPU evidence suite in one command (see bench/gpu_suite.py for what it runs and writes).
#   bash bench/gpu_suite.sh OUT_DIR [--smoke] [other bench/gpu_suite.py options]
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash bench/gpu_suite.sh OUT_DIR [--smoke] [bench/gpu_suite.py options]" >&2
  exit 2
fi
out="$1"; shift
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_suite.py --out "$out" "$@"
