#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating and installing it first when needed.
#   bash scripts/env.sh python cookbook/sft.py
#   bash scripts/env.sh python -m pytest
# The environment is rebuilt whenever pyproject.toml changes. torch is pinned here: an unpinned torch
# would pull a multi-GB CUDA build on machines that only need the CPU one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TWINKLE_VENV:-$root/.venv}"
torch_spec="${TWINKLE_TORCH_SPEC:-torch==2.13.0}"
extras="${TWINKLE_EXTRAS:-ray,server,test}"
stamp="$venv/.twinkle-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/env.sh" | sha256sum | cut -d' ' -f1) $torch_spec $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[twinkle] preparing $venv (one time; a few minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$torch_spec" -e "$root[$extras]"
  # megatron-core's declared dependencies would replace torch; what it needs at import is already here.
  if [ "${TWINKLE_WITH_MEGATRON:-1}" = "1" ]; then
    "$venv/bin/python" -m pip install --quiet --no-deps 'megatron-core>=0.16,<0.17'
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
