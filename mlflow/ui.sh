#!/usr/bin/env bash
# Open the MLflow UI on qtuning's tracking store (mlflow/mlflow.db unless MLFLOW_TRACKING_URI is set).
#   mlflow/ui.sh                 # http://127.0.0.1:5000
#   mlflow/ui.sh --port 5001     # any `qtuning ui` option (the same command)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
cd "$repo"
exec "$py" -m commands.ui "$@"
