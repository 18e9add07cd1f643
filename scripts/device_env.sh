#!/usr/bin/env bash
# Sourced by scripts/build_for_device.sh and scripts/test_device_versions.sh: where the GPU machine's torch lives
# here ($DEVICE_VENV) and how both work on a copy of the checkout instead of the checkout itself.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE_VENV="${DEVICE_VENV:-${TMPDIR:-/tmp}/flood_kernels_device_venv}"

# Sets $work to a temporary copy of the files git tracks and the untracked ones it does not ignore (so not this
# checkout's own build of the extension, made for the CPU torch), removed when the script exits. Call it
# directly, not in $( ): the exit trap belongs to the calling shell.
copy_checkout() {
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$repo_root" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - ) | tar -xf - -C "$work"
}
