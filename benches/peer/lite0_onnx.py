"""Peer benchmark: EfficientNet-Lite0 features (up to one block) as an ONNX graph built from the
same safetensors weights vigil loads, timed with ONNX Runtime and OpenVINO next to vigil's fast
CPU kernels.

Run through scripts/peer-bench.sh (it creates the virtual environment and builds vigil's bench).
The runtimes get the same threads and the same input and alternate round by round (the order
rotating from round to round), so that all see the same machine load; the result is the median
ms per image over all rounds, vigil's ratio to the best peer, and the largest absolute difference
between vigil's features and each peer's. OpenVINO runs in f32 (its CPU plugin would pick bf16
on a CPU with AVX512_BF16, such as Zen 4 and 5, and compute something else).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

BN_EPS = 1e-3
# (kernel, stride, expansion, in, out) of Lite0's 16 blocks, as in src/nn/backbone.rs.
BLOCKS = [
    (3, 1, 1, 32, 16), (3, 2, 6, 16, 24), (3, 1, 6, 24, 24), (5, 2, 6, 24, 40),
    (5, 1, 6, 40, 40), (3, 2, 6, 40, 80), (3, 1, 6, 80, 80), (3, 1, 6, 80, 80),
    (5, 1, 6, 80, 112), (5, 1, 6, 112, 112), (5, 1, 6, 112, 112), (5, 2, 6, 112, 192),
    (5, 1, 6, 192, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192), (3, 1, 6, 192, 320),
]


def same_pads(n, kernel, stride):
    total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def fold(w, bn):
    scale = bn["weight"] / np.sqrt(bn["running_var"] + BN_EPS)
    bias = bn["bias"] - bn["running_mean"] * scale
    return (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32), bias.astype(np.float32)


def build(weights_path, last_block, size):
    t = load_file(weights_path)
    bn = lambda p: {k: t[f"{p}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def const(array, prefix):
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), n))
        return n

    def conv(x, w, b, kernel, stride, groups, hw, relu6):
        top, bottom = same_pads(hw[0], kernel, stride)
        left, right = same_pads(hw[1], kernel, stride)
        y = name("conv")
        nodes.append(helper.make_node(
            "Conv", [x, const(w, "w"), const(b, "b")], [y], kernel_shape=[kernel, kernel],
            strides=[stride, stride], pads=[top, left, bottom, right], group=groups))
        out_hw = (-(-hw[0] // stride), -(-hw[1] // stride))
        if relu6:
            z = name("relu6")
            nodes.append(helper.make_node("Clip", [y, const(0.0, "lo"), const(6.0, "hi")], [z]))
            y = z
        return y, out_hw

    x = "images"
    pre = name("pre")
    nodes.append(helper.make_node("Mul", [x, const(2.0, "two")], [pre + "m"]))
    nodes.append(helper.make_node("Sub", [pre + "m", const(1.0, "one")], [pre]))
    w, b = fold(t["_conv_stem.weight"], bn("_bn0"))
    h, hw = conv(pre, w, b, 3, 2, 1, (size, size), True)
    for i, (k, s, e, cin, cout) in enumerate(BLOCKS[: last_block + 1]):
        p = f"_blocks.{i}"
        inp = h
        if e != 1:
            w, b = fold(t[f"{p}._expand_conv.weight"], bn(f"{p}._bn0"))
            h, _ = conv(h, w, b, 1, 1, 1, hw, True)
        w, b = fold(t[f"{p}._depthwise_conv.weight"], bn(f"{p}._bn1"))
        h, out_hw = conv(h, w, b, k, s, cin * e, hw, True)
        w, b = fold(t[f"{p}._project_conv.weight"], bn(f"{p}._bn2"))
        h, _ = conv(h, w, b, 1, 1, 1, out_hw, False)
        if s == 1 and cin == cout:
            y = name("add")
            nodes.append(helper.make_node("Add", [h, inp], [y]))
            h = y
        hw = out_hw
    nodes.append(helper.make_node("Identity", [h], ["features"]))
    graph = helper.make_graph(
        nodes, "lite0_features",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(
            "features", TensorProto.FLOAT, ["batch", BLOCKS[last_block][4], hw[0], hw[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def ort_session(model, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def openvino_model(model, threads):
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda images: request.infer({0: images}, share_inputs=True)[0]


def ort_runner(session):
    return lambda images: session.run(None, {"images": images})[0]


def time_peer(run, images, iterations):
    for _ in range(3):
        run(images)
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        run(images)
        samples.append((time.perf_counter() - start) * 1e3 / images.shape[0])
    return statistics.median(samples)


def cpu_model():
    try:
        info = open("/proc/cpuinfo").read().splitlines()
        field = lambda n: next(l.split(":", 1)[1].strip() for l in info if l.startswith(n))
        return f"{field('model name')} (family {field('cpu family')}, model {field('model')})"
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def time_vigil(binary, weights, block, size, batch, iterations, threads, files=()):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        [binary, weights, str(block), str(size), str(batch), str(iterations), *files],
        env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split("median_ms_per_image")[1].split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--vigil", required=True, help="the lite0_peer bench executable")
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--peers", default="onnxruntime,openvino")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    model = build(args.weights, args.block, args.size)
    peers = {}
    versions = {}
    for name in args.peers.split(","):
        if name == "onnxruntime":
            import onnxruntime as ort
            peers[name] = ort_runner(ort_session(model, args.threads))
            versions[name] = ort.__version__
        elif name == "openvino":
            import openvino as ov
            peers[name] = openvino_model(model, args.threads)
            versions[name] = ov.get_version()
        else:
            raise SystemExit(f"unknown peer {name!r} (onnxruntime, openvino)")
    cpu = cpu_model()
    print(f"{cpu}; {args.threads} threads; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
          flush=True)
    rng = np.random.default_rng(0)
    results = {"cpu": cpu, "versions": versions, "threads": args.threads, "size": args.size,
               "block": args.block, "rounds": args.rounds, "iterations": args.iterations,
               "batches": {}}
    names = ["vigil", *peers]
    with tempfile.TemporaryDirectory() as tmp:
        for batch in [int(b) for b in args.batches.split(",")]:
            images = rng.random((batch, 3, args.size, args.size), dtype=np.float32)
            inp, outp = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
            images.tofile(inp)
            time_vigil(args.vigil, args.weights, args.block, args.size, batch, 1, args.threads,
                       (inp, outp))
            ours = np.fromfile(outp, dtype=np.float32)
            diffs = {name: float(np.abs(ours - run(images).reshape(-1)).max())
                     for name, run in peers.items()}
            rounds = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    if name == "vigil":
                        ms = time_vigil(args.vigil, args.weights, args.block, args.size, batch,
                                        args.iterations, args.threads)
                    else:
                        ms = time_peer(peers[name], images, args.iterations)
                    rounds[name].append(ms)
            median = {name: statistics.median(v) for name, v in rounds.items()}
            best = min(peers, key=median.get)
            ratio = median["vigil"] / median[best]
            results["batches"][batch] = {
                "ms_per_image": median, "best_peer": best, "ratio_to_best_peer": ratio,
                "max_abs_diff": diffs, "rounds": rounds}
            cells = ", ".join(f"{name} {median[name]:.2f}" for name in names)
            print(f"batch {batch}: ms/image {cells}; vigil / best peer ({best}) {ratio:.2f}x; "
                  "max |diff| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
            for name in names:
                print(f"  rounds {name}: " + " ".join(f"{x:.2f}" for x in rounds[name]),
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
