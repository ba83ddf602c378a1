#!/usr/bin/env bash
# What pip cannot install: a Java runtime for Spark, native BLAS/LAPACK for Spark ML, shellcheck,
# and Chromium with its driver (the identify service's browser test).
# Without native LAPACK, Spark falls back to a Java port that returned wrong PCA variances on
# tiny-magnitude features (0.27 instead of 0.99). Installs them with apt when run as root.
set -euo pipefail

need=()
if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
  need+=(openjdk-17-jre-headless)
fi
if ! ldconfig -p 2>/dev/null | grep -q 'liblapack.so.3'; then
  need+=(libblas3 liblapack3)
fi
if ! command -v shellcheck >/dev/null 2>&1; then
  need+=(shellcheck)  # the tests lint bootstrap/*.sh
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  need+=(chromium chromium-driver)  # the browser test of `make serve` (headless, driven by selenium)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} (apt)"
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${need[@]}"; }
else
  echo "missing system packages: ${need[*]}" >&2
  echo "install them (Debian/Ubuntu: sudo apt-get install ${need[*]}); Spark needs Java 8/11/17" >&2
  exit 1
fi
