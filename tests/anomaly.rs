//! Anomaly synthesis: exact masks, non-empty, deterministic, configurable.
use vigil::data::anomaly::{
    confetti_noise, AnomalyGenerator, AnomalySynth, ConfettiLayer, ConfettiParams, CutPasteParams,
    CutPasteVariant, CutoutParams, PerlinBlendParams, WeightedGenerator, MIN_CHANGE,
};
use vigil::data::image::{save_png, Image, Mask};
use vigil::data::synth::{product, SynthConfig};
use vigil::error::Error;
use vigil::rng::Rng;

fn generators(texture_dir: Option<std::path::PathBuf>) -> Vec<(&'static str, AnomalyGenerator)> {
    vec![
        ("cutout", AnomalyGenerator::Cutout(CutoutParams::default())),
        (
            "cutout-solid",
            AnomalyGenerator::Cutout(CutoutParams {
                noise_probability: 0.0,
                ..Default::default()
            }),
        ),
        (
            "patch",
            AnomalyGenerator::CutPaste(CutPasteParams::default()),
        ),
        (
            "patch-no-jitter",
            AnomalyGenerator::CutPaste(CutPasteParams {
                jitter: 0.0,
                ..Default::default()
            }),
        ),
        (
            "scar",
            AnomalyGenerator::CutPaste(CutPasteParams {
                variant: CutPasteVariant::Scar,
                ..Default::default()
            }),
        ),
        (
            "confetti",
            AnomalyGenerator::Confetti(ConfettiParams::default()),
        ),
        (
            "confetti-dense-upright",
            AnomalyGenerator::Confetti(ConfettiParams {
                colour_rate: 2e-3,
                dark_rate: 1e-3,
                max_rotation_deg: 0.0,
                ..Default::default()
            }),
        ),
        (
            "perlin",
            AnomalyGenerator::PerlinBlend(PerlinBlendParams::default()),
        ),
        (
            "perlin-faint",
            AnomalyGenerator::PerlinBlend(PerlinBlendParams {
                opacity: [0.1, 0.15],
                ..Default::default()
            }),
        ),
        (
            "perlin-textures",
            AnomalyGenerator::PerlinBlend(PerlinBlendParams {
                texture_dir,
                ..Default::default()
            }),
        ),
    ]
}

/// Test images: textured grey (square), textured RGB (non-square), flat mid-grey (a pasted patch
/// equals its destination) and saturated white (changes must go down).
fn images() -> Vec<(&'static str, Image)> {
    let mut rng = Rng::new(11);
    let grey = SynthConfig {
        height: 48,
        width: 48,
        ..Default::default()
    };
    let rgb = SynthConfig {
        height: 40,
        width: 64,
        channels: 3,
        ..Default::default()
    };
    let flat = |v: f32| Image {
        data: vec![v; 3 * 32 * 32],
        ..Image::zeros(3, 32, 32)
    };
    vec![
        ("grey", product(&grey, &mut rng, None).0),
        ("rgb", product(&rgb, &mut rng, None).0),
        ("flat", flat(0.5)),
        ("white", flat(1.0)),
    ]
}

/// Tolerance: none. Pixels outside the mask must be bit-identical and every mask pixel must change
/// by at least MIN_CHANGE (less a float rounding margin) in some channel.
fn check_exact(name: &str, input: &Image, out: &Image, mask: &Mask) {
    let (c, h, w) = (input.channels, input.height, input.width);
    assert_eq!((out.channels, out.height, out.width), (c, h, w), "{name}");
    assert_eq!((mask.height, mask.width), (h, w), "{name}");
    assert!(mask.any(), "{name}: empty mask");
    let n = h * w;
    for i in 0..n {
        let change = (0..c)
            .map(|ch| (out.data[ch * n + i] - input.data[ch * n + i]).abs())
            .fold(0.0f32, f32::max);
        for ch in 0..c {
            let v = out.data[ch * n + i];
            assert!((0.0..=1.0).contains(&v), "{name}: value {v} at {i}");
        }
        if mask.data[i] == 0 {
            assert_eq!(change, 0.0, "{name}: pixel {i} changed outside the mask");
        } else {
            assert_eq!(mask.data[i], 1, "{name}: mask value");
            assert!(
                change >= MIN_CHANGE - 1e-6,
                "{name}: mask pixel {i} changed only {change}"
            );
        }
    }
}

#[test]
fn every_generator_changes_exactly_its_mask_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(3);
    for i in 0..3 {
        let cfg = SynthConfig {
            height: 70,
            width: 50,
            channels: 3,
            ..Default::default()
        };
        save_png(
            &product(&cfg, &mut rng, None).0,
            &dir.path().join(format!("t{i}.png")),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();

    for (gen_name, generator) in generators(Some(dir.path().to_path_buf())) {
        let synth = AnomalySynth::single(generator).unwrap();
        for (image_name, image) in images() {
            let mut mask_sizes = Vec::new();
            for seed in 0..25 {
                let name = format!("{gen_name} on {image_name}, seed {seed}");
                let (out, mask) = synth.apply(&image, &mut Rng::new(seed)).unwrap();
                check_exact(&name, &image, &out, &mask);
                let again = synth.apply(&image, &mut Rng::new(seed)).unwrap();
                assert_eq!(
                    (&out, &mask),
                    (&again.0, &again.1),
                    "{name}: not deterministic"
                );
                mask_sizes.push(mask.data.iter().filter(|&&m| m != 0).count());
            }
            mask_sizes.dedup();
            assert!(
                mask_sizes.len() > 5,
                "{gen_name} on {image_name}: seeds give the same masks"
            );
        }
    }
}

#[test]
fn weights_choose_generators_in_proportion() {
    // Cutout masks are filled axis-aligned rectangles; Perlin masks practically never are.
    let synth = AnomalySynth::new(&[
        WeightedGenerator {
            weight: 3.0,
            generator: AnomalyGenerator::Cutout(CutoutParams::default()),
        },
        WeightedGenerator {
            weight: 1.0,
            generator: AnomalyGenerator::PerlinBlend(PerlinBlendParams::default()),
        },
    ])
    .unwrap();
    let image = images().remove(0).1;
    let mut rng = Rng::new(5);
    let draws = 200;
    let rectangles = (0..draws)
        .filter(|_| is_filled_rectangle(&synth.apply(&image, &mut rng).unwrap().1))
        .count();
    let share = rectangles as f32 / draws as f32;
    assert!(
        (0.65..0.85).contains(&share),
        "cutout share {share}, expected 0.75"
    );
}

fn is_filled_rectangle(mask: &Mask) -> bool {
    let on: Vec<(usize, usize)> = (0..mask.data.len())
        .filter(|&i| mask.data[i] != 0)
        .map(|i| (i / mask.width, i % mask.width))
        .collect();
    let (y0, y1) = (
        on.iter().map(|p| p.0).min().unwrap(),
        on.iter().map(|p| p.0).max().unwrap(),
    );
    let (x0, x1) = (
        on.iter().map(|p| p.1).min().unwrap(),
        on.iter().map(|p| p.1).max().unwrap(),
    );
    on.len() == (y1 - y0 + 1) * (x1 - x0 + 1)
}

#[test]
fn config_parses_from_toml_with_defaults_and_rejects_mistakes() {
    #[derive(serde::Deserialize)]
    struct MethodConfig {
        anomalies: Vec<WeightedGenerator>,
    }
    let text = r#"
        [[anomalies]]
        kind = "cut-paste"
        variant = "scar"
        weight = 2

        [[anomalies]]
        kind = "perlin-blend"
        opacity = [0.2, 0.9]

        [[anomalies]]
        kind = "confetti"
        colour_rate = 3e-5
    "#;
    let cfg: MethodConfig = toml::from_str(text).unwrap();
    assert_eq!(cfg.anomalies.len(), 3);
    assert_eq!(cfg.anomalies[0].weight, 2.0);
    assert_eq!(
        cfg.anomalies[0].generator,
        AnomalyGenerator::CutPaste(CutPasteParams {
            variant: CutPasteVariant::Scar,
            ..Default::default()
        })
    );
    assert_eq!(
        cfg.anomalies[2].generator,
        AnomalyGenerator::Confetti(ConfettiParams {
            colour_rate: 3e-5,
            ..Default::default()
        })
    );
    assert_eq!(cfg.anomalies[1].weight, 1.0);
    assert_eq!(
        cfg.anomalies[1].generator,
        AnomalyGenerator::PerlinBlend(PerlinBlendParams {
            opacity: [0.2, 0.9],
            ..Default::default()
        })
    );
    AnomalySynth::new(&cfg.anomalies).unwrap();

    // Round trip through JSON (model files store the config).
    let json = serde_json::to_string(&cfg.anomalies).unwrap();
    let back: Vec<WeightedGenerator> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg.anomalies);

    let typo = "[[anomalies]]\nkind = \"cutout\"\nareas = [0.1, 0.2]\n";
    let err = toml::from_str::<MethodConfig>(typo)
        .err()
        .expect("typo accepted");
    assert!(err.to_string().contains("areas"), "{err}");
    let unknown = "[[anomalies]]\nkind = \"sparkle\"\n";
    assert!(toml::from_str::<MethodConfig>(unknown).is_err());

    let bad_range = vec![
        WeightedGenerator {
            weight: 1.0,
            generator: AnomalyGenerator::Cutout(CutoutParams::default()),
        },
        WeightedGenerator {
            weight: 1.0,
            generator: AnomalyGenerator::Cutout(CutoutParams {
                area: [0.3, 0.1],
                ..Default::default()
            }),
        },
    ];
    match AnomalySynth::new(&bad_range) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "anomalies[1].area"),
        other => panic!("expected a config error, got {:?}", other.err()),
    }
    let zero_weight = [WeightedGenerator {
        weight: 0.0,
        generator: AnomalyGenerator::Confetti(ConfettiParams::default()),
    }];
    match AnomalySynth::new(&zero_weight) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "anomalies[0].weight"),
        other => panic!("expected a config error, got {:?}", other.err()),
    }
    assert!(matches!(AnomalySynth::new(&[]), Err(Error::Config { .. })));
}

#[test]
fn missing_texture_folder_and_bad_images_are_errors() {
    let missing = std::path::PathBuf::from("/nonexistent/textures");
    let err = AnomalySynth::single(AnomalyGenerator::PerlinBlend(PerlinBlendParams {
        texture_dir: Some(missing.clone()),
        ..Default::default()
    }))
    .err()
    .expect("missing folder accepted");
    assert!(err.to_string().contains("/nonexistent/textures"), "{err}");

    let synth = AnomalySynth::single(AnomalyGenerator::Cutout(CutoutParams::default())).unwrap();
    let malformed = Image {
        data: vec![0.5; 10],
        ..Image::zeros(1, 8, 8)
    };
    assert!(matches!(
        synth.apply(&malformed, &mut Rng::new(0)),
        Err(Error::Invalid { .. })
    ));
    assert!(synth
        .apply(&Image::zeros(1, 1, 8), &mut Rng::new(0))
        .is_err());
}

/// Expected mask and values of confetti on `image` for `seed`, replaying FCDD's rule from the
/// public noise: the synth draws its generator pick first, then the noise.
fn confetti_by_hand(image: &Image, params: &ConfettiParams, seed: u64) -> (Vec<f32>, Mask, bool) {
    let mut rng = Rng::new(seed);
    rng.f32();
    let (c, h, w) = (image.channels, image.height, image.width);
    let noise = confetti_noise(c, h, w, params, &mut rng).noise;
    let change = |sign: f32| {
        image
            .data
            .iter()
            .zip(&noise.data)
            .map(|(&v, &d)| ((v + sign * d).clamp(0.0, 1.0) - v) as f64)
            .sum::<f64>()
            / image.data.len() as f64
    };
    let (diff, diff_inverted) = (change(1.0).abs(), change(-1.0).abs());
    let inverted = diff < 0.025 / 255.0 && diff_inverted > diff;
    let sign = if inverted { -1.0 } else { 1.0 };
    let out: Vec<f32> = image
        .data
        .iter()
        .zip(&noise.data)
        .map(|(&v, &d)| (v + sign * d).clamp(0.0, 1.0))
        .collect();
    let n = h * w;
    let mut mask = Mask::zeros(h, w);
    for i in 0..n {
        mask.data[i] = u8::from((0..c).any(|ch| out[ch * n + i] != image.data[ch * n + i]));
    }
    (out, mask, inverted)
}

#[test]
fn confetti_mask_is_exactly_the_pixels_the_added_noise_changes() {
    let params = ConfettiParams::default();
    let synth = AnomalySynth::single(AnomalyGenerator::Confetti(params.clone())).unwrap();
    let mut rng = Rng::new(21);
    let textured = |channels: usize, height: usize, width: usize, rng: &mut Rng| {
        let cfg = SynthConfig {
            height,
            width,
            channels,
            ..Default::default()
        };
        product(&cfg, rng, None).0
    };
    let mut images = vec![
        ("grey 96x96", textured(1, 96, 96, &mut rng)),
        ("rgb 80x120", textured(3, 80, 120, &mut rng)),
        ("black grey", Image::zeros(1, 96, 96)),
        ("black rgb", Image::zeros(3, 64, 64)),
    ];
    images.push((
        "white rgb",
        Image {
            data: vec![1.0; 3 * 64 * 64],
            ..Image::zeros(3, 64, 64)
        },
    ));
    let mut inversions = 0;
    for (name, image) in &images {
        let n = image.height * image.width;
        for seed in 0..60 {
            let (out, mask) = synth.apply(image, &mut Rng::new(seed)).unwrap();
            let (expected, expected_mask, inverted) = confetti_by_hand(image, &params, seed);
            if !expected_mask.any() {
                continue; // redrawn by the generator: not this replay
            }
            inversions += usize::from(inverted);
            assert_eq!(mask, expected_mask, "{name}, seed {seed}: mask");
            check_exact(name, image, &out, &mask);
            for i in (0..n).filter(|&i| mask.data[i] != 0) {
                let largest = (0..image.channels)
                    .map(|ch| (expected[ch * n + i] - image.data[ch * n + i]).abs())
                    .fold(0.0f32, f32::max);
                if largest < MIN_CHANGE {
                    continue; // pushed to MIN_CHANGE
                }
                for ch in 0..image.channels {
                    let k = ch * n + i;
                    assert_eq!(out.data[k], expected[k], "{name}, seed {seed}: value {k}");
                }
            }
        }
    }
    // On black images a faint coloured blob changes almost nothing: FCDD then flips the noise, so
    // the dark blobs turn white. Some seeds must exercise that branch.
    assert!(inversions > 0, "the invert rule never applied");
}

#[test]
fn confetti_has_a_blob_in_each_layer_of_the_scaled_size() {
    let params = ConfettiParams::default();
    for &(channels, height, width) in &[(3, 240, 240), (1, 64, 96), (3, 120, 120), (1, 20, 30)] {
        let scale = height.min(width) as f32 / 240.0;
        let lo = ((8.0 * scale).round() as usize).max(1);
        let hi = ((54.0 * scale).round() as usize).max(1);
        let (mut sides, mut colour_blobs) = (Vec::new(), 0usize);
        let seeds = 300;
        for seed in 0..seeds {
            let drawn = confetti_noise(channels, height, width, &params, &mut Rng::new(seed));
            let again = confetti_noise(channels, height, width, &params, &mut Rng::new(seed));
            assert_eq!(drawn, again, "seed {seed}: not deterministic");
            let name = format!("{channels}x{height}x{width}, seed {seed}");
            let colour: Vec<_> = drawn
                .blobs
                .iter()
                .filter(|b| b.layer == ConfettiLayer::Colour)
                .collect();
            let dark: Vec<_> = drawn
                .blobs
                .iter()
                .filter(|b| b.layer == ConfettiLayer::Dark)
                .collect();
            assert!(
                !colour.is_empty() && !dark.is_empty(),
                "{name}: a layer is empty"
            );
            colour_blobs += colour.len();
            for blob in &drawn.blobs {
                assert!((lo..=hi).contains(&blob.side), "{name}: side {}", blob.side);
                assert!(blob.row < height && blob.col < width, "{name}: centre");
                assert_eq!(blob.value.len(), channels, "{name}");
                sides.push(blob.side);
            }
            for blob in &colour {
                assert!(
                    blob.angle_deg.abs() <= 45.0,
                    "{name}: angle {}",
                    blob.angle_deg
                );
                assert!(blob.value.iter().all(|v| (0.0..=1.0).contains(v)), "{name}");
                let levels = blob.value.iter().map(|v| v * 255.0);
                assert!(
                    levels.into_iter().all(|l| (l - l.round()).abs() < 1e-3),
                    "{name}"
                );
            }
            for blob in &dark {
                assert_eq!(blob.angle_deg, 0.0, "{name}: dark blobs are upright");
                assert!(blob.value.iter().all(|&v| v == -1.0), "{name}");
                // An upright blob well inside the image covers exactly side² pixels.
                let (r, c, s) = (blob.row, blob.col, blob.side);
                if r >= s && c >= s && r + s < height && c + s < width {
                    let covered = (0..height)
                        .flat_map(|y| (0..width).map(move |x| (x, y)))
                        .filter(|&(x, y)| blob.covers(x, y))
                        .count();
                    assert_eq!(covered, s * s, "{name}: upright blob of side {s}");
                }
            }
            // The noise is the last coloured blob covering a pixel plus −1 per dark layer hit.
            let n = height * width;
            for y in 0..height {
                for x in 0..width {
                    let i = y * width + x;
                    for ch in 0..channels {
                        let colour_part = colour
                            .iter()
                            .rev()
                            .find(|b| b.covers(x, y))
                            .map_or(0.0, |b| b.value[ch]);
                        let dark_part = if dark.iter().any(|b| b.covers(x, y)) {
                            -1.0
                        } else {
                            0.0
                        };
                        assert_eq!(
                            drawn.noise.data[ch * n + i],
                            colour_part + dark_part,
                            "{name}: noise at ({x}, {y}), channel {ch}"
                        );
                    }
                }
            }
        }
        // Sides are uniform over the scaled range: both ends occur.
        assert!(
            sides.contains(&lo) && sides.contains(&hi),
            "{height}x{width}: {lo}..={hi}"
        );
        // Per-pixel rate 1.8e-5 with at least one blob: E[K | K >= 1] = λ / (1 - e^-λ).
        let lambda = 1.8e-5 * (height * width) as f64;
        let expected = lambda / (1.0 - (-lambda).exp());
        let mean = colour_blobs as f64 / seeds as f64;
        let tolerance = 0.15 * expected.max(1.0);
        assert!(
            (mean - expected).abs() < tolerance,
            "{height}x{width}: {mean} coloured blobs per image, expected {expected}"
        );
    }
}

#[test]
fn confetti_parameters_are_validated() {
    for (field, params) in [
        (
            "colour_rate",
            ConfettiParams {
                colour_rate: 0.0,
                ..Default::default()
            },
        ),
        (
            "dark_rate",
            ConfettiParams {
                dark_rate: 1.5,
                ..Default::default()
            },
        ),
        (
            "side_px",
            ConfettiParams {
                side_px: [10, 5],
                ..Default::default()
            },
        ),
        (
            "reference_size",
            ConfettiParams {
                reference_size: 0,
                ..Default::default()
            },
        ),
        (
            "max_rotation_deg",
            ConfettiParams {
                max_rotation_deg: -1.0,
                ..Default::default()
            },
        ),
    ] {
        match AnomalyGenerator::Confetti(params).validate("anomalies[0]") {
            Err(Error::Config { field: got, .. }) => {
                assert_eq!(got, format!("anomalies[0].{field}"))
            }
            other => panic!("{field}: expected a config error, got {other:?}"),
        }
    }
}
