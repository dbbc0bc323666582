#!/usr/bin/env bash
# Debian packages. `system-deps.sh run`: tcmalloc (libtcmalloc-minimal4: normlab's training
# processes run with it, ~1.3x faster on a CPU; without it they use glibc's malloc, tuned)
# and a C compiler (gcc: normlab builds its ReLU -> norm kernels with it on first use,
# ~1.2x faster; without one, runs use torch's norms) and a C++ one (g++: torch.compile's
# inductor builds the steps of the zoo's norms and the other networks; without it,
# autograd). `system-deps.sh` (the tests): also Chromium (the report's browser test),
# LibreOffice Calc (the workbook's recalculation test) and Debian's copy of Fashion-MNIST.
# Installs only what is missing; needs root (or sudo) the first time.
set -euo pipefail
need=()
ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || need+=(libtcmalloc-minimal4)
command -v "${CC:-cc}" >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ "${1:-test}" != run ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v libreoffice >/dev/null 2>&1 || need+=(libreoffice-calc-nogui)
  [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
fi
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
