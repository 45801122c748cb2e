//! The pretrained backbone, its weights importer and the depthwise convolution.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use vigil::nn::backbone::{load_tensors, EfficientNetLite0, Lite0Features};
use vigil::nn::depthwise::{depthwise_conv2d, DepthwiseConv, SamePad};
use vigil::nn::FeatureExtractor;
use vigil::rng::Rng;
use vigil::weights::import_legacy_pth;
use vigil::Error;

mod common;
use common::max_abs_diff;

fn random(rng: &mut Rng, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// Candle's grouped convolution with the same asymmetric padding, as the reference.
fn grouped_conv_reference(x: &Tensor, w: &Tensor, stride: usize, pad: SamePad) -> Tensor {
    let channels = x.dim(1).unwrap();
    let x = x
        .pad_with_zeros(2, pad.top, pad.bottom)
        .unwrap()
        .pad_with_zeros(3, pad.left, pad.right)
        .unwrap();
    x.conv2d(w, 0, stride, 1, channels).unwrap()
}

#[test]
fn same_pad_matches_tensorflow() {
    // 224 at stride 2, k 3: output 112, total (111*2 + 3) - 224 = 1, the odd pixel bottom/right.
    let pad = SamePad::new(224, 225, 3, 2);
    assert_eq!((pad.top, pad.bottom), (0, 1));
    assert_eq!((pad.left, pad.right), (1, 1));
    let pad = SamePad::new(14, 14, 5, 1);
    assert_eq!((pad.top, pad.bottom, pad.left, pad.right), (2, 2, 2, 2));
}

#[test]
fn depthwise_equals_grouped_conv() {
    let mut rng = Rng::new(7);
    for &(batch, channels, height, width) in
        &[(1, 4, 9, 12), (3, 5, 8, 7), (1, 3, 16, 16), (3, 2, 5, 6)]
    {
        for kernel in [3, 5] {
            for stride in [1, 2] {
                let x = random(&mut rng, &[batch, channels, height, width]);
                let w = random(&mut rng, &[channels, 1, kernel, kernel]);
                let pad = SamePad::new(height, width, kernel, stride);
                let ours = depthwise_conv2d(&x, &w, stride, pad).unwrap();
                let reference = grouped_conv_reference(&x, &w, stride, pad);
                assert_eq!(
                    ours.dims(),
                    &[
                        batch,
                        channels,
                        height.div_ceil(stride),
                        width.div_ceil(stride)
                    ]
                );
                let diff = max_abs_diff(&ours, &reference);
                assert!(
                    diff < 1e-5,
                    "B{batch} C{channels} {height}x{width} k{kernel} s{stride}: max diff {diff}"
                );
            }
        }
    }
    // Padding other than "same" (here none, and all on one side) works too.
    let x = random(&mut rng, &[2, 3, 11, 10]);
    let w = random(&mut rng, &[3, 1, 3, 3]);
    for pad in [
        SamePad::default(),
        SamePad {
            top: 0,
            bottom: 2,
            left: 3,
            right: 0,
        },
    ] {
        for stride in [1, 2, 3] {
            let diff = max_abs_diff(
                &depthwise_conv2d(&x, &w, stride, pad).unwrap(),
                &grouped_conv_reference(&x, &w, stride, pad),
            );
            assert!(diff < 1e-5, "{pad:?} s{stride}: max diff {diff}");
        }
    }
}

#[test]
fn depthwise_rejects_mismatched_shapes() {
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((3, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let err = depthwise_conv2d(&x, &w, 1, SamePad::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 input channels"), "{err}");
    let w = Tensor::zeros((4, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(depthwise_conv2d(&x, &w, 0, SamePad::default()).is_err());
    let tiny = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(depthwise_conv2d(&tiny, &w, 1, SamePad::default()).is_err());
    assert!(depthwise_conv2d(&x.flatten_all().unwrap(), &w, 1, SamePad::default()).is_err());
}

#[test]
fn depthwise_layer_trains() {
    // Both the weight and the input receive a gradient equal to the grouped convolution's.
    let mut rng = Rng::new(3);
    let x = Var::from_tensor(&random(&mut rng, &[2, 3, 7, 9])).unwrap();
    let w0 = random(&mut rng, &[3, 1, 5, 5]);
    let vb = VarBuilder::from_tensors(
        [("weight".to_string(), w0.clone())].into(),
        DType::F32,
        &Device::Cpu,
    );
    let layer = DepthwiseConv::new(vb, 3, 5, 2).unwrap();
    let w = Var::from_tensor(layer.weight()).unwrap();
    let target = random(&mut rng, &[2, 3, 4, 5]);

    let ours = depthwise_conv2d(x.as_tensor(), w.as_tensor(), 2, SamePad::new(7, 9, 5, 2)).unwrap();
    assert!(max_abs_diff(&ours, &layer.forward(x.as_tensor()).unwrap()) == 0.0);
    let loss = (ours - &target).unwrap().sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let reference =
        grouped_conv_reference(x.as_tensor(), w.as_tensor(), 2, SamePad::new(7, 9, 5, 2));
    let ref_loss = (reference - &target)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let ref_grads = ref_loss.backward().unwrap();
    for var in [&w, &x] {
        let g = grads
            .get(var.as_tensor())
            .expect("gradient reaches every input");
        let g_ref = ref_grads.get(var.as_tensor()).unwrap();
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        assert!(max_abs_diff(g, g_ref) < 1e-4);
    }
}

// ---------------------------------------------------------------------------------------------
// The pretrained network (needs models/efficientnet-lite0.safetensors).

fn weights_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0.safetensors");
    assert!(
        path.exists(),
        "{} is missing: run models/get-weights.sh first",
        path.display()
    );
    path
}

fn all_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(weights_path(), &Device::Cpu).unwrap()
}

fn fixture_rgb(name: &str) -> Tensor {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let img = image::open(&path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    Tensor::from_vec(data, (1, h as usize, w as usize, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap()
}

#[test]
fn classifier_recognises_the_cat() {
    let vb = VarBuilder::from_tensors(all_weights(), DType::F32, &Device::Cpu);
    let net = EfficientNetLite0::new(vb, 15, true).unwrap();
    let logits = net.classify(&fixture_rgb("chelsea-224.png")).unwrap();
    assert_eq!(logits.dims(), &[1, 1000]);
    let probs = candle_nn::ops::softmax(&logits, 1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (best, p) = probs
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(
        best, 285,
        "expected ImageNet 285 'Egyptian cat', got class {best} (p {p})"
    );
    assert!(
        (p - 0.79).abs() < 0.03,
        "p(Egyptian cat) = {p}, expected about 0.79"
    );
}

#[test]
fn taps_have_the_documented_shapes_and_strides() {
    let tensors = load_tensors(&weights_path(), 15, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let net = EfficientNetLite0::new(vb, 15, false).unwrap();
    let (height, width) = (50, 37);
    let x = Tensor::full(0.5f32, (2, 3, height, width), &Device::Cpu).unwrap();
    let taps: Vec<usize> = (0..=15).collect();
    let maps = net.forward_taps(&x, &taps).unwrap();
    let mut seen = Vec::new();
    for (&tap, map) in taps.iter().zip(&maps) {
        let stride = EfficientNetLite0::block_stride(tap).unwrap();
        let channels = EfficientNetLite0::block_channels(tap).unwrap();
        assert_eq!(
            map.dims(),
            &[2, channels, height.div_ceil(stride), width.div_ceil(stride)],
            "block {tap}"
        );
        seen.push((channels, stride));
    }
    assert_eq!(seen[2], (24, 4));
    assert_eq!(seen[4], (40, 8));
    assert_eq!(seen[7], (80, 16));
    assert_eq!(seen[10], (112, 16));
    assert_eq!(seen[15], (320, 32));
    assert!(EfficientNetLite0::block_stride(16).is_err());
    assert!(net.forward_taps(&x, &[]).is_err());
    assert!(net
        .classify(&x)
        .unwrap_err()
        .to_string()
        .contains("classifier"));
    let bad = Tensor::zeros((1, 2, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(net
        .forward_taps(&bad, &[3])
        .unwrap_err()
        .to_string()
        .contains("[1, 2, 32, 32]"));
}

#[test]
fn features_concatenate_taps_at_the_finest_resolution() {
    let tensors = load_tensors(&weights_path(), 10, &Device::Cpu).unwrap();
    assert!(tensors
        .keys()
        .all(|k| !k.starts_with("_blocks.11") && !k.starts_with("_fc")));
    assert!(tensors.contains_key("_blocks.10._project_conv.weight"));
    let features = Lite0Features::new(&tensors, vec![4, 7, 10], &Device::Cpu).unwrap();
    assert_eq!(features.out_channels(), 40 + 80 + 112);
    assert_eq!(features.stride(), 8);

    let mut rng = Rng::new(11);
    let grey = random(&mut rng, &[2, 1, 61, 40]).affine(0.2, 0.5).unwrap();
    let out = features.extract(&grey).unwrap();
    assert_eq!(out.dims(), &[2, 232, 8, 5]);
    // A grey image gives the same features as the grey image replicated to RGB.
    let rgb = grey
        .broadcast_as((2, 3, 61, 40))
        .unwrap()
        .contiguous()
        .unwrap();
    assert!(max_abs_diff(&out, &features.extract(&rgb).unwrap()) < 1e-3);
    // The finest tap is passed through unchanged.
    let net_maps = {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        EfficientNetLite0::new(vb, 10, false)
            .unwrap()
            .forward_taps(&grey, &[4])
            .unwrap()
    };
    assert!(max_abs_diff(&out.narrow(1, 0, 40).unwrap(), &net_maps[0]) < 1e-6);

    assert!(Lite0Features::new(&tensors, vec![], &Device::Cpu).is_err());
    // Block 11 is not in tensors loaded up to block 10.
    let err = Lite0Features::new(&tensors, vec![11], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("_blocks.11"), "{err}");
}

#[test]
fn load_tensors_names_the_missing_or_misshaped_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let err = load_tensors(&missing, 4, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.safetensors") && err.contains("get-weights.sh"),
        "{err}"
    );

    let mut tensors = load_tensors(&weights_path(), 4, &Device::Cpu).unwrap();
    tensors.remove("_blocks.3._bn1.running_var");
    let partial = dir.path().join("partial.safetensors");
    candle_core::safetensors::save(&tensors, &partial).unwrap();
    let err = load_tensors(&partial, 4, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Weights { .. }));
    assert!(
        err.to_string().contains("_blocks.3._bn1.running_var"),
        "{err}"
    );
    assert!(load_tensors(&partial, 2, &Device::Cpu).is_ok());

    tensors.insert(
        "_blocks.3._bn1.running_var".into(),
        Tensor::ones(7, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &partial).unwrap();
    let err = load_tensors(&partial, 4, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("_blocks.3._bn1.running_var") && err.contains("[7]"),
        "{err}"
    );

    std::fs::write(&partial, b"not safetensors").unwrap();
    assert!(matches!(
        load_tensors(&partial, 4, &Device::Cpu),
        Err(Error::Weights { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// The legacy PyTorch importer, on checkpoints written here in the same format.

/// Writes pickle opcodes for the subset `torch.save` (torch < 1.6, protocol 2) uses.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn string(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn int(&mut self, v: i32) -> &mut Self {
        self.op(b"J").op(&v.to_le_bytes())
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c")
            .op(module.as_bytes())
            .op(b"\n")
            .op(name.as_bytes())
            .op(b"\n")
    }
    fn ints(&mut self, values: &[i32]) -> &mut Self {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t")
    }
    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b")R")
    }
}

struct FakeTensor {
    name: &'static str,
    storage: &'static str,
    storage_type: &'static str,
    storage_numel: i32,
    offset: i32,
    size: &'static [i32],
    stride: &'static [i32],
}

/// `storages`: key, element size in bytes, raw data.
fn legacy_checkpoint(tensors: &[FakeTensor], storages: &[(&str, usize, Vec<u8>)]) -> Vec<u8> {
    let mut p = Pickle::default();
    p.op(&[
        0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
    ])
    .op(b".");
    p.op(&[0x80, 2])
        .op(b"M")
        .op(&1001u16.to_le_bytes())
        .op(b".");
    p.op(&[0x80, 2])
        .op(b"}(")
        .string("protocol_version")
        .int(1001);
    p.string("little_endian")
        .op(&[0x88])
        .string("type_sizes")
        .op(b"}(");
    p.string("short")
        .int(2)
        .string("int")
        .int(4)
        .string("long")
        .int(4)
        .op(b"uu.");
    p.op(&[0x80, 2]).ordered_dict().op(b"(");
    for t in tensors {
        p.string(t.name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((");
        p.string("storage")
            .global("torch", t.storage_type)
            .string(t.storage)
            .string("cpu");
        p.int(t.storage_numel)
            .op(b"NtQ")
            .int(t.offset)
            .ints(t.size)
            .ints(t.stride);
        p.op(&[0x89]).ordered_dict().op(b"tR");
    }
    // state_dict()._metadata arrives through BUILD.
    p.op(b"u}").string("_metadata").ordered_dict().op(b"sb.");
    p.op(&[0x80, 2]).op(b"](");
    for (key, _, _) in storages {
        p.string(key);
    }
    p.op(b"e.");
    for (_, element, data) in storages {
        p.op(&((data.len() / element) as u64).to_le_bytes())
            .op(data);
    }
    p.0
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn sample_checkpoint() -> Vec<u8> {
    let tensors = [
        FakeTensor {
            name: "a.weight",
            storage: "0",
            storage_type: "FloatStorage",
            storage_numel: 6,
            offset: 0,
            size: &[2, 3],
            stride: &[3, 1],
        },
        // A transposed view of the same storage.
        FakeTensor {
            name: "a.t",
            storage: "0",
            storage_type: "FloatStorage",
            storage_numel: 6,
            offset: 0,
            size: &[3, 2],
            stride: &[1, 3],
        },
        FakeTensor {
            name: "b.bias",
            storage: "1",
            storage_type: "FloatStorage",
            storage_numel: 5,
            offset: 2,
            size: &[3],
            stride: &[1],
        },
        FakeTensor {
            name: "bn.num_batches_tracked",
            storage: "2",
            storage_type: "LongStorage",
            storage_numel: 1,
            offset: 0,
            size: &[],
            stride: &[],
        },
    ];
    let storages = [
        ("0", 4, f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])),
        ("1", 4, f32_bytes(&[10.0, 11.0, 12.0, 13.0, 14.0])),
        ("2", 8, 7i64.to_le_bytes().to_vec()),
    ];
    legacy_checkpoint(&tensors, &storages)
}

#[test]
fn importer_converts_a_legacy_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (
        dir.path().join("in.pth"),
        dir.path().join("out.safetensors"),
    );
    std::fs::write(&src, sample_checkpoint()).unwrap();
    let summary = import_legacy_pth(&src, &dst).unwrap();
    assert_eq!(summary.tensors, 3);
    assert_eq!(summary.parameters, 15);
    assert_eq!(summary.skipped, vec!["bn.num_batches_tracked".to_string()]);
    assert_eq!(summary.source_sha256.len(), 64);

    let out = candle_core::safetensors::load(&dst, &Device::Cpu).unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(
        out["a.weight"].to_vec2::<f32>().unwrap(),
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    );
    assert_eq!(
        out["a.t"].to_vec2::<f32>().unwrap(),
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    );
    assert_eq!(out["b.bias"].to_vec1::<f32>().unwrap(), [12.0, 13.0, 14.0]);
    // Converting again gives the same bytes (get-weights.sh pins the output's sha256).
    let first = std::fs::read(&dst).unwrap();
    import_legacy_pth(&src, &dst).unwrap();
    assert_eq!(first, std::fs::read(&dst).unwrap());
}

#[test]
fn importer_rejects_truncated_and_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (
        dir.path().join("in.pth"),
        dir.path().join("out.safetensors"),
    );
    let good = sample_checkpoint();
    for cut in 0..good.len() {
        std::fs::write(&src, &good[..cut]).unwrap();
        match import_legacy_pth(&src, &dst) {
            Err(Error::Weights { path, .. }) => assert_eq!(path, src),
            other => panic!("file cut at {cut} of {} bytes: {other:?}", good.len()),
        }
        assert!(!dst.exists(), "nothing is written for a bad file");
    }
    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&src, &longer).unwrap();
    assert!(import_legacy_pth(&src, &dst)
        .unwrap_err()
        .to_string()
        .contains("unexpected bytes"));

    // Opcode arguments that would make the pickle VM panic or allocate gigabytes.
    let protocol_at = 15;
    let mut wide_int = good[..protocol_at].to_vec();
    wide_int.extend_from_slice(&[0x80, 2, 0x8a, 16]);
    wide_int.extend_from_slice(&[0xff; 16]);
    wide_int.extend_from_slice(&good[protocol_at + 6..]);
    let mut huge_string = good[..protocol_at].to_vec();
    huge_string.extend_from_slice(&[0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'.']);
    for (what, bytes) in [("wide integer", wide_int), ("huge string", huge_string)] {
        std::fs::write(&src, &bytes).unwrap();
        let err = import_legacy_pth(&src, &dst).unwrap_err();
        assert!(matches!(err, Error::Weights { .. }), "{what}: {err}");
    }

    std::fs::write(&src, b"PK\x03\x04 a zip archive").unwrap();
    assert!(import_legacy_pth(&src, &dst)
        .unwrap_err()
        .to_string()
        .contains("zip"));
    let err = import_legacy_pth(&dir.path().join("absent.pth"), &dst).unwrap_err();
    assert!(err.to_string().contains("absent.pth"));
}

/// Timings for the report, not a check: `RAYON_NUM_THREADS=2 cargo test --release --test backbone
/// -- --ignored --nocapture backbone_timings`.
#[test]
#[ignore]
fn backbone_timings() {
    let median_ms = |f: &dyn Fn()| {
        for _ in 0..3 {
            f();
        }
        let mut times: Vec<f64> = (0..15)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let vb = VarBuilder::from_tensors(all_weights(), DType::F32, &Device::Cpu);
    let net = EfficientNetLite0::new(vb, 15, true).unwrap();
    let features = Lite0Features::new(&all_weights(), vec![4, 7, 10], &Device::Cpu).unwrap();
    for (channels, height, width) in [(3, 256, 256), (1, 256, 256), (3, 256, 640), (1, 256, 640)] {
        let x = Tensor::full(0.5f32, (1, channels, height, width), &Device::Cpu).unwrap();
        let taps = median_ms(&|| {
            net.forward_taps(&x, &[4, 7, 10]).unwrap();
        });
        let extract = median_ms(&|| {
            features.extract(&x).unwrap();
        });
        println!("{channels}x{height}x{width}: forward_taps [4,7,10] {taps:.1} ms, Lite0Features::extract {extract:.1} ms");
    }
    let cat = fixture_rgb("chelsea-224.png");
    let classify = median_ms(&|| {
        net.classify(&cat).unwrap();
    });
    println!("classify 224x224: {classify:.1} ms");

    // Depthwise layers alone, as Lite0 sees them at 224²: shifted multiply-adds vs grouped conv.
    let layers = [
        (32, 112, 3, 1),
        (96, 112, 3, 2),
        (144, 56, 3, 1),
        (144, 56, 5, 2),
        (240, 28, 5, 1),
        (240, 28, 3, 2),
        (480, 14, 3, 1),
        (480, 14, 5, 1),
        (672, 14, 5, 1),
        (672, 14, 5, 2),
        (1152, 7, 5, 1),
        (1152, 7, 3, 1),
    ];
    let mut rng = Rng::new(1);
    let inputs: Vec<_> = layers
        .iter()
        .map(|&(c, n, k, s)| {
            (
                random(&mut rng, &[1, c, n, n]),
                random(&mut rng, &[c, 1, k, k]),
                s,
                SamePad::new(n, n, k, s),
            )
        })
        .collect();
    let ours = median_ms(&|| {
        for (x, w, s, pad) in &inputs {
            depthwise_conv2d(x, w, *s, *pad).unwrap();
        }
    });
    let grouped = median_ms(&|| {
        for (x, w, s, pad) in &inputs {
            grouped_conv_reference(x, w, *s, *pad);
        }
    });
    println!("one of each Lite0 depthwise layer shape at 224²: shifted {ours:.1} ms, grouped conv2d {grouped:.1} ms");
}
