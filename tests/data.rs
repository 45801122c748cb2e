//! Image loading, datasets on disk, and the synthetic product, on trees written to temp folders.
mod crafted_png;

use std::path::{Path, PathBuf};

use crafted_png::{claimed_png, crc32};
use image::{ImageBuffer, Luma, Rgb, Rgba};
use vigil::data::dataset::{
    fingerprint, load_samples, DataSource, Dataset, Sample, SplitOptions, GOOD,
};
use vigil::data::image::{
    load_image, load_image_limited, load_mask, probe, save_mask_png, save_png, Image, ImageLimits,
    InputSpec, Mask,
};
use vigil::data::synth::{generate, product, DefectKind, SynthConfig};
use vigil::error::Error;
use vigil::rng::Rng;

fn grey_spec(height: usize, width: usize) -> InputSpec {
    InputSpec {
        height,
        width,
        channels: 1,
    }
}

/// A grey image whose value encodes `tag`, so tests can tell files apart after loading.
fn write_grey(path: &Path, h: u32, w: u32, tag: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    ImageBuffer::from_fn(w, h, |x, y| Luma([tag.wrapping_add((x + y) as u8)]))
        .save_with_format(path, image::ImageFormat::Png)
        .unwrap();
}

fn write_mask(path: &Path, h: u32, w: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    ImageBuffer::from_fn(w, h, |x, _| Luma([if x < w / 2 { 255u8 } else { 0 }]))
        .save(path)
        .unwrap();
}

/// root/train/good: 10 images (one named .PNG) plus a text file; test/good: 2; test/scratch: 2
/// (one without a mask); test/dent: 1; ground_truth masks.
fn mvtec_tree(root: &Path) {
    for i in 0..9 {
        write_grey(&root.join(format!("train/good/{i:03}.png")), 12, 20, i * 10);
    }
    write_grey(&root.join("train/good/009.PNG"), 12, 20, 90);
    std::fs::write(root.join("train/good/readme.txt"), "not an image").unwrap();
    for i in 0..2 {
        write_grey(&root.join(format!("test/good/{i:03}.png")), 12, 20, 100 + i);
        write_grey(
            &root.join(format!("test/scratch/{i:03}.png")),
            12,
            20,
            120 + i,
        );
    }
    write_grey(&root.join("test/dent/000.png"), 12, 20, 140);
    write_mask(&root.join("ground_truth/scratch/000_mask.png"), 12, 20);
    write_mask(&root.join("ground_truth/dent/000_mask.png"), 12, 20);
}

fn names(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .map(|s| {
            let p = &s.path;
            let dir = p.parent().unwrap().file_name().unwrap().to_string_lossy();
            format!("{dir}/{}", p.file_name().unwrap().to_string_lossy())
        })
        .collect()
}

#[test]
fn mvtec_layout_splits_train_and_finds_masks() {
    let dir = tempfile::tempdir().unwrap();
    mvtec_tree(dir.path());
    let source = DataSource::Mvtec {
        root: dir.path().to_path_buf(),
    };
    let ds = Dataset::open(&source, &SplitOptions::default()).unwrap();
    assert_eq!((ds.train.len(), ds.validation.len()), (9, 1));
    let mut all: Vec<String> = names(&ds.train);
    all.extend(names(&ds.validation));
    all.sort();
    let expected: Vec<String> = (0..9)
        .map(|i| format!("good/{i:03}.png"))
        .chain(["good/009.PNG".to_string()])
        .collect();
    assert_eq!(all, expected, "every train image once, text file ignored");
    assert!(names(&ds.train).windows(2).all(|w| w[0] < w[1]), "sorted");
    assert!(ds
        .train
        .iter()
        .all(|s| !s.is_defective() && s.mask.is_none()));

    assert_eq!(
        names(&ds.test),
        [
            "good/000.png",
            "good/001.png",
            "dent/000.png",
            "scratch/000.png",
            "scratch/001.png"
        ]
    );
    let types: Vec<&str> = ds.test.iter().map(|s| s.defect_type.as_str()).collect();
    assert_eq!(types, [GOOD, GOOD, "dent", "scratch", "scratch"]);
    assert!(!ds.test[0].is_defective() && ds.test[2].is_defective());
    assert_eq!(
        ds.test[3].mask.as_deref(),
        Some(
            dir.path()
                .join("ground_truth/scratch/000_mask.png")
                .as_path()
        )
    );
    assert_eq!(
        ds.test[4].mask, None,
        "a missing mask is None, not an error"
    );
    assert_eq!(ds.test[0].mask, None);
}

#[test]
fn split_is_deterministic_by_seed_and_sized_by_fraction() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..20 {
        write_grey(&dir.path().join(format!("good/{i:02}.png")), 4, 4, i);
    }
    let source = DataSource::Plain {
        good: dir.path().join("good"),
        defect: None,
        masks: None,
    };
    let open = |fraction: f32, seed: u64| {
        Dataset::open(
            &source,
            &SplitOptions {
                validation_fraction: fraction,
                seed,
                ..Default::default()
            },
        )
    };
    let a = open(0.25, 1).unwrap();
    assert_eq!((a.train.len(), a.validation.len()), (15, 5));
    assert_eq!(a, open(0.25, 1).unwrap(), "same seed, same split");
    assert!(
        (2..8).any(|seed| open(0.25, seed).unwrap().validation != a.validation),
        "seeds never change the split"
    );
    assert_eq!(
        open(0.0, 1).unwrap().validation.len(),
        1,
        "at least one held out"
    );
    match open(1.0, 1) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "validation_fraction"),
        other => panic!("fraction 1.0 accepted: {other:?}"),
    }

    // Two images: one each; a single image: all for training.
    let small = tempfile::tempdir().unwrap();
    write_grey(&small.path().join("a.png"), 4, 4, 0);
    let single = DataSource::Plain {
        good: small.path().to_path_buf(),
        defect: None,
        masks: None,
    };
    let ds = Dataset::open(&single, &SplitOptions::default()).unwrap();
    assert_eq!((ds.train.len(), ds.validation.len()), (1, 0));
    write_grey(&small.path().join("b.png"), 4, 4, 0);
    let ds = Dataset::open(&single, &SplitOptions::default()).unwrap();
    assert_eq!((ds.train.len(), ds.validation.len()), (1, 1));
}

#[test]
fn plain_folders_give_good_then_defect_test_with_masks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for i in 0..4 {
        write_grey(&p.join(format!("ok/{i}.png")), 8, 8, i);
    }
    write_grey(&p.join("bad/x.png"), 8, 8, 50);
    write_grey(&p.join("bad/y.bmp"), 8, 8, 60);
    write_grey(&p.join("bad/z.png"), 8, 8, 70);
    write_mask(&p.join("masks/x_mask.png"), 8, 8);
    write_mask(&p.join("masks/y.png"), 8, 8);
    let ds = Dataset::open(
        &DataSource::Plain {
            good: p.join("ok"),
            defect: Some(p.join("bad")),
            masks: Some(p.join("masks")),
        },
        &SplitOptions::default(),
    )
    .unwrap();
    assert_eq!(ds.train.len() + ds.validation.len(), 4);
    assert_eq!(
        names(&ds.test),
        [
            "ok/0.png",
            "ok/1.png",
            "ok/2.png",
            "ok/3.png",
            "bad/x.png",
            "bad/y.bmp",
            "bad/z.png"
        ]
    );
    assert!(ds.test[..4].iter().all(|s| s.defect_type == GOOD));
    assert!(ds.test[4..].iter().all(|s| s.defect_type == "defect"));
    assert_eq!(ds.test[4].mask, Some(p.join("masks/x_mask.png")));
    assert_eq!(ds.test[5].mask, Some(p.join("masks/y.png")));
    assert_eq!(ds.test[6].mask, None);
}

#[test]
fn dataset_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("product");
    let open = |root: &Path| {
        Dataset::open(
            &DataSource::Mvtec {
                root: root.to_path_buf(),
            },
            &SplitOptions::default(),
        )
        .unwrap_err()
        .to_string()
    };
    let err = open(&root);
    assert!(
        err.contains("product") && err.contains("does not exist"),
        "{err}"
    );
    std::fs::create_dir_all(&root).unwrap();
    assert!(open(&root).contains("train/good"), "{}", open(&root));
    std::fs::create_dir_all(root.join("train/good")).unwrap();
    let err = open(&root);
    assert!(
        err.contains("train/good") && err.contains("no image files"),
        "{err}"
    );
    write_grey(&root.join("train/good/a.png"), 4, 4, 0);
    std::fs::create_dir_all(root.join("test/crack")).unwrap();
    let err = open(&root);
    assert!(err.contains("test/crack"), "{err}");
}

#[test]
fn corrupt_files_fail_by_name_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_grey(&p.join("a.png"), 6, 6, 0);
    std::fs::write(p.join("b.png"), b"this is not a png").unwrap();
    write_grey(&p.join("c.png"), 6, 6, 0);
    let whole = std::fs::read(p.join("c.png")).unwrap();
    std::fs::write(p.join("d.png"), &whole[..whole.len() / 2]).unwrap();
    write_grey(&p.join("e.png"), 6, 6, 0);
    let samples: Vec<Sample> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| Sample {
            path: p.join(format!("{n}.png")),
            defect_type: GOOD.into(),
            mask: None,
        })
        .collect();
    let spec = grey_spec(4, 4);

    match load_samples(&samples, &spec, false, None) {
        Err(Error::Image { path, reason }) => {
            assert_eq!(path, p.join("b.png"), "first bad file in sample order");
            assert!(!reason.is_empty());
        }
        other => panic!("corrupt file accepted: {other:?}"),
    }
    let bar = indicatif::ProgressBar::hidden();
    let report = load_samples(&samples, &spec, true, Some(&bar)).unwrap();
    assert_eq!(bar.position(), 5);
    let loaded: Vec<PathBuf> = report
        .loaded
        .iter()
        .map(|l| l.sample.path.clone())
        .collect();
    assert_eq!(loaded, [p.join("a.png"), p.join("c.png"), p.join("e.png")]);
    let skipped: Vec<PathBuf> = report.skipped.iter().map(|s| s.0.clone()).collect();
    assert_eq!(skipped, [p.join("b.png"), p.join("d.png")]);
    assert!(report
        .skipped
        .iter()
        .all(|(path, why)| why.contains(&*path.to_string_lossy())));

    let err = load_image(&p.join("missing.png"), &spec).unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");
    assert!(probe(&p.join("b.png")).is_err());
}

#[test]
fn load_samples_loads_masks_at_the_input_size() {
    let dir = tempfile::tempdir().unwrap();
    mvtec_tree(dir.path());
    let ds = Dataset::open(
        &DataSource::Mvtec {
            root: dir.path().to_path_buf(),
        },
        &SplitOptions::default(),
    )
    .unwrap();
    let spec = InputSpec {
        height: 6,
        width: 10,
        channels: 3,
    };
    let report = load_samples(&ds.test, &spec, false, None).unwrap();
    assert_eq!(report.loaded.len(), 5);
    for l in &report.loaded {
        assert_eq!(
            (l.image.channels, l.image.height, l.image.width),
            (3, 6, 10)
        );
        assert_eq!(l.mask.is_some(), l.sample.mask.is_some());
    }
    let mask = report.loaded[3].mask.as_ref().unwrap();
    assert_eq!((mask.height, mask.width), (6, 10));
    assert!((0..6).all(|y| mask.data[y * 10..y * 10 + 5].iter().all(|&v| v == 1)));
    assert!((0..6).all(|y| mask.data[y * 10 + 5..y * 10 + 10].iter().all(|&v| v == 0)));
}

#[test]
fn images_convert_channels_resize_non_square_and_decode_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    // Pure red RGB, a 16-bit grey gradient, RGBA with transparent alpha, grey in a .jpg-named PNG.
    ImageBuffer::from_pixel(10, 6, Rgb([255u8, 0, 0]))
        .save(p.join("red.png"))
        .unwrap();
    ImageBuffer::from_fn(30, 20, |x, _| Luma([(x * 2000) as u16]))
        .save(p.join("deep.png"))
        .unwrap();
    ImageBuffer::from_pixel(5, 7, Rgba([0u8, 0, 255, 0]))
        .save(p.join("alpha.png"))
        .unwrap();
    ImageBuffer::from_pixel(8, 8, Luma([51u8]))
        .save_with_format(p.join("grey.jpg"), image::ImageFormat::Png)
        .unwrap();

    let rgb = InputSpec {
        height: 9,
        width: 17,
        channels: 3,
    };
    let red_grey = load_image(&p.join("red.png"), &grey_spec(3, 5)).unwrap();
    assert_eq!(
        (red_grey.channels, red_grey.height, red_grey.width),
        (1, 3, 5)
    );
    assert!(
        red_grey.data.iter().all(|&v| (v - 0.2126).abs() < 0.01),
        "luma of red"
    );
    let red = load_image(&p.join("red.png"), &rgb).unwrap();
    assert_eq!((red.channels, red.height, red.width), (3, 9, 17));
    assert!(red.plane(0).iter().all(|&v| (v - 1.0).abs() < 1e-5));
    assert!(red
        .plane(1)
        .iter()
        .chain(red.plane(2))
        .all(|&v| v.abs() < 1e-5));

    let grey_rgb = load_image(&p.join("grey.jpg"), &rgb).unwrap();
    assert_eq!(grey_rgb.plane(0), grey_rgb.plane(1));
    assert_eq!(grey_rgb.plane(0), grey_rgb.plane(2));
    assert!(grey_rgb.data.iter().all(|&v| (v - 0.2).abs() < 1e-3));

    let deep = load_image(&p.join("deep.png"), &grey_spec(20, 30)).unwrap();
    assert!(
        (deep.data[29] - 29.0 * 2000.0 / 65535.0).abs() < 1e-4,
        "16-bit range kept"
    );
    let blue = load_image(&p.join("alpha.png"), &rgb).unwrap();
    assert!(
        blue.plane(2).iter().all(|&v| (v - 1.0).abs() < 1e-5),
        "alpha dropped"
    );

    assert_eq!(probe(&p.join("red.png")).unwrap(), (3, 6, 10));
    assert_eq!(probe(&p.join("deep.png")).unwrap(), (1, 20, 30));
    assert_eq!(probe(&p.join("alpha.png")).unwrap(), (3, 7, 5));
    assert_eq!(probe(&p.join("grey.jpg")).unwrap(), (1, 8, 8));

    // Other formats round trip.
    for ext in ["bmp", "tif", "jpg"] {
        let path = p.join(format!("x.{ext}"));
        ImageBuffer::from_pixel(16, 16, Luma([200u8]))
            .save(&path)
            .unwrap();
        let img = load_image(&path, &grey_spec(16, 16)).unwrap();
        assert!(
            img.data.iter().all(|&v| (v - 200.0 / 255.0).abs() < 0.02),
            "{ext}"
        );
    }

    let bad_spec = InputSpec { channels: 2, ..rgb };
    assert!(matches!(
        load_image(&p.join("red.png"), &bad_spec),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn resize_keeps_values_and_masks_stay_binary_nearest() {
    let mut img = Image::zeros(2, 4, 6);
    img.data.iter_mut().for_each(|v| *v = 0.3);
    let resized = img.resize(7, 3);
    assert_eq!((resized.channels, resized.height, resized.width), (2, 7, 3));
    assert!(resized.data.iter().all(|&v| (v - 0.3).abs() < 1e-5));

    // A 2x3 mask doubled: each pixel becomes a 2x2 block.
    let mask = Mask {
        height: 2,
        width: 3,
        data: vec![1, 0, 1, 0, 1, 0],
    };
    let big = mask.resize(4, 6);
    let expected: Vec<u8> = [
        [1, 1, 0, 0, 1, 1],
        [1, 1, 0, 0, 1, 1],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
    ]
    .concat();
    assert_eq!(big.data, expected);
    assert_eq!(big.resize(2, 3), mask);

    // Threshold 127 / 128 and nearest resizing when loading.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.png");
    ImageBuffer::from_fn(4, 2, |x, _| Luma([[0u8, 127, 128, 255][x as usize]]))
        .save(&path)
        .unwrap();
    let loaded = load_mask(&path, 2, 8).unwrap();
    assert_eq!(&loaded.data[..8], &[0, 0, 0, 0, 1, 1, 1, 1]);

    // save_mask_png / save_png round trip.
    save_mask_png(&big, &dir.path().join("big.png")).unwrap();
    assert_eq!(load_mask(&dir.path().join("big.png"), 4, 6).unwrap(), big);
    let mut rgb = Image::zeros(3, 5, 7);
    let mut rng = Rng::new(1);
    rgb.data.iter_mut().for_each(|v| *v = rng.f32());
    save_png(&rgb, &dir.path().join("rgb.png")).unwrap();
    let back = load_image(
        &dir.path().join("rgb.png"),
        &InputSpec {
            height: 5,
            width: 7,
            channels: 3,
        },
    )
    .unwrap();
    assert!(rgb
        .data
        .iter()
        .zip(&back.data)
        .all(|(a, b)| (a - b).abs() <= 0.5 / 255.0 + 1e-6));
}

#[test]
fn fingerprint_follows_content_not_location() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    mvtec_tree(a.path());
    mvtec_tree(b.path());
    let open = |root: &Path| {
        Dataset::open(
            &DataSource::Mvtec {
                root: root.to_path_buf(),
            },
            &SplitOptions::default(),
        )
        .unwrap()
    };
    let (da, db) = (open(a.path()), open(b.path()));
    let fa = fingerprint(&da.test).unwrap();
    assert_eq!(fa.len(), 64);
    assert_eq!(fa, fingerprint(&db.test).unwrap());
    let mut reversed = da.test.clone();
    reversed.reverse();
    assert_eq!(fa, fingerprint(&reversed).unwrap(), "order-independent");
    write_grey(&b.path().join("test/dent/000.png"), 12, 20, 141);
    assert_ne!(fa, fingerprint(&db.test).unwrap());
    write_mask(&a.path().join("ground_truth/dent/000_mask.png"), 12, 18);
    assert_ne!(fa, fingerprint(&da.test).unwrap(), "masks count");
    assert_ne!(
        fingerprint(&da.train).unwrap(),
        fingerprint(&da.test).unwrap()
    );
}

fn read_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    path.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn synth_is_byte_identical_per_seed_and_opens_as_mvtec() {
    let cfg = SynthConfig {
        height: 48,
        width: 64,
        train_good: 6,
        test_good: 2,
        test_per_defect: 2,
        seed: 7,
        ..Default::default()
    };
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let summary = generate(a.path(), &cfg).unwrap();
    assert_eq!(summary.files, 6 + 2 + 2 * 3 * 2);
    generate(b.path(), &cfg).unwrap();
    generate(
        c.path(),
        &SynthConfig {
            seed: 8,
            ..cfg.clone()
        },
    )
    .unwrap();
    let tree = read_tree(a.path());
    assert_eq!(tree.len(), summary.files);
    assert_eq!(tree, read_tree(b.path()), "same seed, same bytes");
    let other = read_tree(c.path());
    assert!(
        tree.iter()
            .zip(&other)
            .all(|(x, y)| x.0 == y.0 && x.1 != y.1),
        "seed ignored"
    );

    let ds = Dataset::open(
        &DataSource::Mvtec {
            root: a.path().to_path_buf(),
        },
        &SplitOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (ds.train.len(), ds.validation.len(), ds.test.len()),
        (5, 1, 8)
    );
    assert!(ds.test.iter().all(|s| s.is_defective() == s.mask.is_some()));
    let spec = grey_spec(48, 64);
    let loaded = load_samples(&ds.test, &spec, false, None).unwrap();
    for l in loaded.loaded.iter().filter(|l| l.sample.is_defective()) {
        assert!(l.mask.as_ref().unwrap().any(), "{:?}", l.sample.path);
    }
    assert!(matches!(
        generate(a.path(), &SynthConfig { channels: 2, ..cfg }),
        Err(Error::Config { .. })
    ));
}

#[test]
fn synth_defects_change_exactly_their_masks_with_visible_contrast() {
    for channels in [1, 3] {
        let cfg = SynthConfig {
            height: 64,
            width: 96,
            channels,
            ..Default::default()
        };
        let mut rng = Rng::new(21);
        let (first, _) = product(&cfg, &mut rng.clone(), None);
        let (second, _) = product(&cfg, &mut rng.fork(99), None);
        let variation = first
            .data
            .iter()
            .zip(&second.data)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / first.data.len() as f32;
        assert!(
            variation > 0.01,
            "defect-free images too alike: {variation}"
        );

        for kind in DefectKind::ALL {
            for _ in 0..10 {
                let mut state = rng.fork(kind as u64);
                let (good, empty) = product(&cfg, &mut state.clone(), None);
                let (bad, mask) = product(&cfg, &mut state, Some(kind));
                assert!(!empty.any());
                assert!(mask.any(), "{kind:?}: empty mask");
                let n = 64 * 96;
                let mut total = 0.0;
                for i in 0..n {
                    // Changes must survive 8-bit PNG quantisation.
                    let change = (0..channels)
                        .map(|c| (bad.data[c * n + i] - good.data[c * n + i]).abs())
                        .fold(0.0f32, f32::max);
                    assert_eq!(
                        mask.data[i] != 0,
                        change > 1.5 / 255.0,
                        "{kind:?} pixel {i}"
                    );
                    total += change;
                }
                let contrast = total / mask.data.iter().filter(|&&m| m != 0).count() as f32;
                assert!(
                    (0.04..0.3).contains(&contrast),
                    "{kind:?}: mean contrast {contrast} on the mask"
                );
            }
        }
    }
}

#[test]
fn crafted_png_header_is_what_it_claims() {
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claimed.png");
    std::fs::write(&path, claimed_png(30_000, 20_000)).unwrap();
    assert_eq!(probe(&path).unwrap(), (3, 20_000, 30_000));
}

#[test]
fn oversized_images_are_refused_from_the_header_fast() {
    let dir = tempfile::tempdir().unwrap();
    let spec = grey_spec(8, 8);
    let default = ImageLimits::default().max_bytes;
    for (w, h, max_bytes, key) in [
        (
            30_000,
            30_000,
            default,
            "30000x30000, above input.max_width 8192",
        ),
        (
            100,
            30_000,
            default,
            "100x30000, above input.max_height 8192",
        ),
        (
            8192,
            8192,
            16 << 20,
            "201326592 bytes is above input.max_bytes 16777216",
        ),
    ] {
        let path = dir.path().join(format!("{w}x{h}.png"));
        std::fs::write(&path, claimed_png(w, h)).unwrap();
        let limits = ImageLimits {
            max_bytes,
            ..ImageLimits::default()
        };
        let start = std::time::Instant::now();
        let err = load_image_limited(&path, &spec, &limits).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, Error::Image { .. }), "{err:?}");
        let err = err.to_string();
        let named = err.contains(key) && err.contains(&format!("{w}x{h}.png"));
        assert!(named, "{err}");
        assert!(took < std::time::Duration::from_millis(100), "{took:?}");
    }
}

#[test]
fn images_within_limits_load_as_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rgb.png");
    ImageBuffer::from_fn(256, 192, |x, y| Rgb([x as u8, (y * 3) as u8, 100u8]))
        .save(&path)
        .unwrap();
    for channels in [1, 3] {
        let spec = InputSpec {
            height: 16,
            width: 24,
            channels,
        };
        assert_eq!(
            load_image_limited(&path, &spec, &ImageLimits::default()).unwrap(),
            load_image(&path, &spec).unwrap()
        );
    }
    // 256 x 192 RGB8 decodes to 147456 bytes: exactly at the limit passes, one byte less does not.
    let spec = grey_spec(16, 24);
    let at = ImageLimits {
        max_bytes: 147_456,
        ..ImageLimits::default()
    };
    assert!(load_image_limited(&path, &spec, &at).is_ok());
    let err = load_image_limited(
        &path,
        &spec,
        &ImageLimits {
            max_bytes: 147_455,
            ..at
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("decoded size 147456 bytes is above input.max_bytes 147455"),
        "{err}"
    );
}
