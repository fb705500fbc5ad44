#!/usr/bin/env bash
# Create the MONAI Label 0.8.5 environment that serves the CalSAM bundle, or reuse it when it is current.
#
# MONAI Label 0.8.5 needs numpy below 2 and pydicom below 3, which the training environment cannot have, so it
# gets its own virtual environment outside the repository (default ~/.cache/calsam/monailabel-venv, or
# $CALSAM_MONAILABEL_ENV). The environment records the SHA-256 of requirements-monailabel.txt after a complete
# install; a later call with the same requirements only checks the imports and returns. A failed install is
# resumed by the next call. Progress goes to stderr; the last line on stdout is the environment's folder.
#
# Usage: bash .ci/setup_monailabel_env.sh [PYTHON]   (PYTHON defaults to python3; 3.10 or newer)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$repo_root/requirements-monailabel.txt"
env_dir="${CALSAM_MONAILABEL_ENV:-$HOME/.cache/calsam/monailabel-venv}"
base_python="${1:-python3}"
stamp="$env_dir/.calsam-requirements.sha256"
check_imports="import monailabel, monai, numpy, pydicom, segment_anything, nibabel, ignite
assert numpy.__version__.split('.')[0] == '1', numpy.__version__
assert monailabel.__version__.startswith('0.8.5'), monailabel.__version__"

mkdir -p "$(dirname "$env_dir")"
# Two test runs starting at once would otherwise install into one folder concurrently.
exec 9>"$env_dir.lock"
flock --timeout 3600 9

wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$env_dir/bin/python" -c "$check_imports" 2>/dev/null; then
    echo "MONAI Label environment $env_dir is current." >&2
    echo "$env_dir"
    exit 0
fi

echo "Building the MONAI Label environment in $env_dir (several minutes on first run)." >&2
rm -f "$stamp"
if [ ! -x "$env_dir/bin/python" ]; then
    "$base_python" -m venv "$env_dir"
fi
# --no-compile skips writing .pyc files for every installed module, which saved about 0.5 GB and 80 s of CPU time on
# a 2-core machine. Python then compiles the modules the server imports when it first imports them.
"$env_dir/bin/python" -m pip install --no-compile --upgrade pip >&2
# torch first: segment-anything and sam2 import it while installing, and pip's constraints pick the local build.
"$env_dir/bin/python" -m pip install --no-compile torch torchvision >&2
"$env_dir/bin/python" -m pip install --no-compile -r "$requirements" >&2
"$env_dir/bin/python" -c "$check_imports"
echo "$wanted" >"$stamp"
echo "MONAI Label environment ready in $env_dir." >&2
echo "$env_dir"
