#!/usr/bin/env bash
# Peer benchmark: vigil's fast CPU kernels next to ONNX Runtime and OpenVINO on the same
# EfficientNet-Lite0 network (features up to block 10, stride 16) built as an ONNX graph from the
# same weights, the three alternating round by round.
#   scripts/peer-bench.sh [--block 10] [--size 256] [--batches 1,8] [--threads 2] [--rounds 5]
#                         [--peers onnxruntime,openvino] [--json FILE]
# Needs models/efficientnet-lite0.safetensors (models/get-weights.sh) and PyPI access for the
# virtual environment it creates under target/peer-venv (onnx, onnxruntime, openvino, numpy,
# safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/peer-venv
if ! "$VENV/bin/python" -c 'import onnx, onnxruntime, openvino, numpy, safetensors' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet onnx onnxruntime openvino numpy safetensors
fi
BIN=$(cargo bench --bench lite0_peer --no-run --message-format=json 2>/dev/null |
    "$VENV/bin/python" -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "lite0_peer":
        print(m["executable"])')
exec "$VENV/bin/python" benches/peer/lite0_onnx.py --weights models/efficientnet-lite0.safetensors \
    --vigil "$BIN" "$@"
