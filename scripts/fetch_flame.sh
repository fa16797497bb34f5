#!/usr/bin/env bash
# Download FLAME 2020 (generic_model.pkl) with your own FLAME account, the way DECA's fetch script does.
# FLAME is licensed by the Max Planck Institute for Intelligent Systems: register and accept the licence at
# https://flame.is.tue.mpg.de first. Nothing here stores your credentials.
# Usage: scripts/fetch_flame.sh [DEST_DIR]   (default: ./flame_model)
set -euo pipefail
dest="${1:-flame_model}"
urle () { [[ "${1}" ]] || return 1; local LANG=C i x; for (( i = 0; i < ${#1}; i++ )); do x="${1:i:1}"; [[ "${x}" == [a-zA-Z0-9.~-] ]] && echo -n "${x}" || printf '%%%02X' "'${x}"; done; echo; }
echo "FLAME account (https://flame.is.tue.mpg.de):"
read -rp "Username (email): " username
read -rsp "Password: " password; echo
mkdir -p "$dest"
wget --post-data "username=$(urle "$username")&password=$(urle "$password")" \
  'https://download.is.tue.mpg.de/download.php?domain=flame&sfile=FLAME2020.zip&resume=1' \
  -O "$dest/FLAME2020.zip" --no-check-certificate --continue
unzip -o "$dest/FLAME2020.zip" -d "$dest"
echo "FLAME model: $dest/generic_model.pkl  (pass --flame $dest/generic_model.pkl or set RELIABLESWAP_FLAME)"
echo "Landmark embedding: take DECA's data/landmark_embedding.npy, or RingNet's flame_static_embedding.pkl"
echo "and flame_dynamic_embedding.npy, and put it beside generic_model.pkl."
