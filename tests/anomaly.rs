//! Anomaly synthesis: exact masks, non-empty, deterministic, configurable.
use vigil::data::anomaly::{
    AnomalyGenerator, AnomalySynth, ConfettiParams, CutPasteParams, CutPasteVariant, CutoutParams,
    PerlinBlendParams, WeightedGenerator, MIN_CHANGE,
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
            "confetti-smudged",
            AnomalyGenerator::Confetti(ConfettiParams {
                smudge_probability: 1.0,
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
        blobs = [1, 4]
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
