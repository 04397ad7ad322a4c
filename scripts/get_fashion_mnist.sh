#!/usr/bin/env bash
# Make Fashion-MNIST available to mocoq, the cheapest way that works on this machine:
#   1. already there (Debian package path or ~/.cache/mocoq)  -> nothing to do
#   2. apt-get install dataset-fashion-mnist (as root, or with passwordless sudo)
#   3. torchvision's download into ~/.cache/mocoq/FashionMNIST
# Exits non-zero with a message saying both ways if none works.
set -u
DEBIAN_DIR=/usr/share/datasets/fashion-mnist
CACHE_DIR="${HOME}/.cache/mocoq"
PYTHON="${PYTHON:-python3}"

have() { [ -f "$1/train-images-idx3-ubyte.gz" ] || [ -f "$1/train-images-idx3-ubyte" ]; }

if have "$DEBIAN_DIR" || have "$CACHE_DIR/FashionMNIST/raw"; then
  exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "Installing Fashion-MNIST with apt-get (dataset-fashion-mnist)..."
    if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
      have "$DEBIAN_DIR" && exit 0
    fi
  fi
fi

echo "Downloading Fashion-MNIST with torchvision into $CACHE_DIR ..."
errors=$(mktemp)
if "$PYTHON" -c "from torchvision.datasets import FashionMNIST as F; F('$CACHE_DIR', train=True, download=True); F('$CACHE_DIR', train=False, download=True)" \
  2>"$errors" && have "$CACHE_DIR/FashionMNIST/raw"; then
  rm -f "$errors"
  exit 0
fi
echo "The download failed: $(awk 'NF && !/^[[:space:]]/' "$errors" | tail -n 1)" >&2
rm -f "$errors"

cat >&2 <<MSG
Fashion-MNIST is not available. Either
  - install the Debian package:  sudo apt-get install dataset-fashion-mnist
  - or download it:              python -c "from torchvision.datasets import FashionMNIST; FashionMNIST('$CACHE_DIR', download=True)"
and run again (or point mocoq-train at your copy with dataset.root=<dir>).
MSG
exit 1
