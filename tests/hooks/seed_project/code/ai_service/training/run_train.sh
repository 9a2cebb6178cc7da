#!/usr/bin/env bash
# The seed's training entry point: one stage per call (remoteops runs
# `bash code/ai_service/training/run_train.sh {stage}` from the project root).
set -euo pipefail
stage="$1"
here="$(cd "$(dirname "$0")" && pwd)"
echo "run_train.sh: stage $stage (run dir ${REMOTEOPS_RUN_DIR:-none})"
exec "@PYTHON@" "$here/train.py" "$stage"
