#!/usr/bin/env bash
# EMR bootstrap action: install the project's pinned Python dependencies on every node.
# Args: <requirements URI> <constraints URI> [python]. Both files are the repo's own
# requirements/runtime.txt and requirements/lock.txt, so nodes get the same pins as a local install.
# The URIs are s3:// on EMR (fetched with the node's aws CLI) or local paths: the standalone cluster
# (fruits.cloud.standalone) runs this same script to build its nodes' environment, with a venv's python
# (Debian refuses pip into the system python) and without the Amazon Linux packages.
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
fetch() {  # <uri> <local file>
  if [[ "$1" == s3://* ]]; then aws s3 cp --only-show-errors "$1" "$2"; else cp "$1" "$2"; fi
}
fetch "${requirements_uri}" "${workdir}/runtime.txt"
fetch "${constraints_uri}" "${workdir}/lock.txt"
as_root() { if [[ ${EUID} -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

stamp="${FRUITS_STAMP_DIR:-/var/tmp}/fruits-deps-$(cat "${workdir}/runtime.txt" "${workdir}/lock.txt" | sha256sum | cut -c1-16)"
if [[ -f "${stamp}" ]]; then
  log "dependencies already installed (${stamp}): nothing to do"
  exit 0
fi

if command -v dnf >/dev/null 2>&1; then  # Amazon Linux (EMR)
  if ! command -v "${python}" >/dev/null 2>&1; then
    log "installing $(basename "${python}") (Amazon Linux 2023 package)"
    as_root dnf install -y -q "$(basename "${python}")" "$(basename "${python}")-pip"
  fi
  # Native BLAS/LAPACK: Spark ML's Java fallback gave wrong PCA variances on tiny-magnitude features.
  as_root dnf install -y -q blas lapack
elif ! command -v "${python}" >/dev/null 2>&1; then
  log "no ${python} and no dnf to install it: give an existing interpreter as the third argument"
  exit 1
fi

log "pip install -r runtime.txt -c lock.txt with ${python}"
as_root "${python}" -m pip install --quiet --no-cache-dir -r "${workdir}/runtime.txt" -c "${workdir}/lock.txt"

"${python}" - <<'PY'
import numpy, onnxruntime, pandas, PIL, pyarrow, tensorflow
print("imports ok:", "tensorflow", tensorflow.__version__, "onnxruntime", onnxruntime.__version__, "pyarrow", pyarrow.__version__,
      "pillow", PIL.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__)
PY

as_root touch "${stamp}"
log "done"
