#!/usr/bin/env bash
# EMR bootstrap action: install the project's pinned Python dependencies on every node.
# Args: <requirements s3 URI> <constraints s3 URI> [python]. Both files are the repo's own
# requirements/runtime.txt and requirements/lock.txt, so nodes get the same pins as a local install.
# Idempotent (a stamp per pin set); fails loudly; logs to ~/fruits-bootstrap.log and to the step log.
set -euo pipefail

requirements_uri=${1:?usage: install-deps.sh <requirements s3 uri> <constraints s3 uri> [python]}
constraints_uri=${2:?usage: install-deps.sh <requirements s3 uri> <constraints s3 uri> [python]}
python=${3:-/usr/bin/python3.11}

exec > >(tee -a "${HOME}/fruits-bootstrap.log") 2>&1
log() { printf '[fruits-bootstrap] %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
log "start on $(hostname)"

workdir=$(mktemp -d)
trap 'rm -rf "${workdir}"' EXIT
aws s3 cp --only-show-errors "${requirements_uri}" "${workdir}/runtime.txt"
aws s3 cp --only-show-errors "${constraints_uri}" "${workdir}/lock.txt"

stamp="${FRUITS_STAMP_DIR:-/var/tmp}/fruits-deps-$(cat "${workdir}/runtime.txt" "${workdir}/lock.txt" | sha256sum | cut -c1-16)"
if [[ -f "${stamp}" ]]; then
  log "dependencies already installed (${stamp}): nothing to do"
  exit 0
fi

if ! command -v "${python}" >/dev/null 2>&1; then
  log "installing $(basename "${python}") (Amazon Linux 2023 package)"
  sudo dnf install -y -q "$(basename "${python}")" "$(basename "${python}")-pip"
fi
# Native BLAS/LAPACK: Spark ML's Java fallback gave wrong PCA variances on tiny-magnitude features.
sudo dnf install -y -q blas lapack

log "pip install -r runtime.txt -c lock.txt with ${python}"
sudo "${python}" -m pip install --quiet --no-cache-dir -r "${workdir}/runtime.txt" -c "${workdir}/lock.txt"

"${python}" - <<'PY'
import numpy, onnxruntime, pandas, PIL, pyarrow, tensorflow
print("imports ok:", "tensorflow", tensorflow.__version__, "onnxruntime", onnxruntime.__version__, "pyarrow", pyarrow.__version__,
      "pillow", PIL.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__)
PY

sudo touch "${stamp}"
log "done"
