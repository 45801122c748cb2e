//! The inspection station end to end, with a tiny NF-BMR trained once for the whole file.
//! Needs the backbone weights that `scripts/test.sh` installs (models/get-weights.sh).
mod station_common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use station_common::*;
use vigil::calibration::Calibration;
use vigil::commands::{self, ScoreArgs};
use vigil::data::synth::{self, SynthConfig};
use vigil::error::{Error, Result};
use vigil::rng::Rng;
use vigil::station::pty::{self, LineReader};
use vigil::station::source::FrameSource;
use vigil::station::{self, Controls, Event, Frame, Hooks};

#[test]
fn pty_end_to_end_matches_vigil_score_line_for_line() {
    let f = fixture();
    let parts: Vec<PathBuf> = f.good.iter().chain(&f.defect).cloned().collect();
    let dir = line_folder("e2e", &parts);
    let pair = pty::open().unwrap();
    // Every part must be scored, however slow the machine (under qemu-aarch64 a queued part
    // can wait past the default 1 s deadline); deadlines have their own test.
    let cfg = config(
        &dir,
        &format!(
            "{}[serial]\nport = {:?}\nheartbeat_s = 0\n[decision]\ndeadline_ms = 60000\n",
            folder_source(&dir, false, 0.0),
            pair.port.display().to_string()
        ),
    );
    let mut reader = LineReader::new(pair.master);
    let (summary, lines) = with_station(cfg, Controls::default(), Hooks::default(), |done| {
        let mut lines = Vec::new();
        read_all(&mut reader, done, &mut lines);
        lines
    });
    let results: Vec<(u64, String, String)> = lines.iter().filter_map(|l| res_fields(l)).collect();
    assert_eq!(results.len(), parts.len(), "lines: {lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("READY ")),
        "lines: {lines:?}"
    );

    let offline = commands::score(&ScoreArgs {
        model: f.model.clone(),
        calibration: Some(f.calibration.clone()),
        images: files(&dir.join("line")),
        heatmap: None,
        run: run_opts(),
    })
    .unwrap();
    for (i, ((id, verdict, score), line)) in results.iter().zip(&offline).enumerate() {
        assert_eq!(*id, i as u64, "capture order");
        let v = line.result.as_ref().unwrap();
        assert_eq!(score, &format!("{:.6}", v.score), "part {i}");
        let expected = if v.reject.unwrap() { "NG" } else { "OK" };
        assert_eq!(verdict, expected, "part {i}");
    }
    assert!(results.iter().any(|r| r.1 == "NG") && results.iter().any(|r| r.1 == "OK"));
    assert_eq!(summary.captured, parts.len() as u64);
}

#[test]
fn corrupt_image_gets_the_fail_safe_verdict_and_the_line_goes_on() {
    let f = fixture();
    let dir = line_folder(
        "corrupt",
        &[f.good[0].clone(), f.good[1].clone(), f.good[2].clone()],
    );
    std::fs::write(dir.join("line/001.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let json = dir.join("results.jsonl");
    let cfg = config(
        &dir,
        &format!(
            "{}[json]\npath = {:?}\n",
            folder_source(&dir, false, 0.0),
            json.display().to_string()
        ),
    );
    let summary = station::run(&cfg, &Controls::default(), Hooks::default()).unwrap();
    let results = json_lines(&json);
    assert_eq!(results.len(), 3);
    assert_eq!(results[1]["verdict"], "NG");
    assert!(results[1]["score"].is_null());
    assert!(
        results[1]["reason"].as_str().unwrap().contains("decode"),
        "{:?}",
        results[1]
    );
    for r in [&results[0], &results[2]] {
        assert!(r["score"].is_number(), "{r:?}");
    }
    assert_eq!(summary.failures, 1);
    assert_eq!(summary.ng + summary.ok, 3);
}

#[test]
fn serial_port_lost_and_back_loses_no_result_and_keeps_the_order() {
    let f = fixture();
    let parts: Vec<PathBuf> = f.good.iter().cycle().take(12).cloned().collect();
    let dir = line_folder("reconnect", &parts);
    let link = dir.join("port");
    let first = pty::open().unwrap();
    std::os::unix::fs::symlink(&first.port, &link).unwrap();
    let cfg = config(
        &dir,
        &format!(
            "{}[serial]\nport = {:?}\nheartbeat_s = 0\nreconnect_ms = 100\n",
            // 250 ms between results: the plug is pulled between two of them.
            folder_source(&dir, false, 4.0),
            link.display().to_string()
        ),
    );
    let (summary, lines) = with_station(cfg, Controls::default(), Hooks::default(), |done| {
        let mut lines = Vec::new();
        let mut reader = LineReader::new(first.master);
        let start = Instant::now();
        // Pull the plug right after result 3 (and whatever came with it).
        while !lines.iter().any(|l: &String| l.starts_with("RES 3 ")) {
            assert!(start.elapsed() < Duration::from_secs(30), "{lines:?}");
            if let Some(line) = reader.read_line(Duration::from_millis(100)) {
                lines.push(line);
            }
        }
        // What had already reached the PLC's side when the plug is pulled was read; bytes still
        // in the line when it goes are lost with it (docs/protocol.md), so pull between lines.
        while let Some(line) = reader.read_line(Duration::from_millis(20)) {
            lines.push(line);
        }
        drop(reader);
        std::fs::remove_file(&link).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let second = pty::open().unwrap();
        std::os::unix::fs::symlink(&second.port, &link).unwrap();
        let mut reader = LineReader::new(second.master);
        read_all(&mut reader, done, &mut lines);
        lines
    });
    // A line whose sending failed part-way (written, then the drain failed as the port went) is
    // sent again once the port is back (docs/protocol.md): at most that one line, identical.
    let res: Vec<&String> = lines.iter().filter(|l| res_fields(l).is_some()).collect();
    let repeats = res.windows(2).filter(|w| w[0] == w[1]).count();
    assert!(repeats <= 1, "lines: {lines:?}");
    let mut ids: Vec<u64> = res
        .iter()
        .filter_map(|l| res_fields(l))
        .map(|r| r.0)
        .collect();
    ids.dedup();
    assert_eq!(ids, (0..12).collect::<Vec<u64>>(), "lines: {lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("FAULT serial")),
        "{lines:?}"
    );
    assert_eq!(summary.serial_dropped, 0);
    assert_eq!(summary.captured, 12);
}

#[test]
fn inference_past_the_deadline_gives_a_counted_fail_safe_ng() {
    let f = fixture();
    let dir = line_folder("deadline", &f.good[..4]);
    let json = dir.join("results.jsonl");
    let cfg = config(
        &dir,
        &format!(
            "{}[decision]\ndeadline_ms = 400\n[json]\npath = {:?}\n",
            // One part a second: the part after the slow one finds inference free again.
            folder_source(&dir, false, 1.0),
            json.display().to_string()
        ),
    );
    let hooks = Hooks {
        before_inference: Some(Arc::new(|id| {
            if id == 1 {
                std::thread::sleep(Duration::from_millis(900));
            }
        })),
        ..Hooks::default()
    };
    let summary = station::run(&cfg, &Controls::default(), hooks).unwrap();
    let results = json_lines(&json);
    let ids: Vec<u64> = results.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert_eq!(results[1]["verdict"], "NG");
    assert_eq!(results[1]["reason"], "deadline");
    assert!(
        results[1]["latency_ms"].as_f64().unwrap() < 800.0,
        "{:?}",
        results[1]
    );
    for i in [0, 2, 3] {
        assert!(results[i]["score"].is_number(), "{:?}", results[i]);
    }
    assert_eq!(summary.deadline_misses, 1);
    assert_eq!(summary.late, 1);
}

#[test]
fn invalid_calibration_reload_is_refused_and_the_old_one_stays() {
    let f = fixture();
    let dir = line_folder("reload", &f.good[..1]);
    let cal_path = dir.join("calibration.toml");
    std::fs::copy(&f.calibration, &cal_path).unwrap();
    let pair = pty::open().unwrap();
    let mut cfg = config(
        &dir,
        &format!(
            "[trigger]\nkind = \"serial\"\n{}[decision]\nreload_poll_ms = 0\n[serial]\nport = {:?}\nheartbeat_s = 0\n",
            folder_source(&dir, true, 0.0),
            pair.port.display().to_string()
        ),
    );
    cfg.calibration = cal_path.clone();
    let original = Calibration::load(&cal_path).unwrap();
    let controls = Controls::default();
    let stop = controls.stop.clone();
    let mut reader = LineReader::new(pair.master);
    let (_, log) = with_station(cfg, controls, Hooks::default(), |_| {
        let mut log = Vec::new();
        let mut expect = |reader: &mut LineReader, prefix: &str| {
            expect_line(reader, prefix, Duration::from_secs(20), &mut log)
        };
        expect(&mut reader, "READY");
        reader.send("TRIG").unwrap();
        let before = expect(&mut reader, "RES 0 ");

        std::fs::write(&cal_path, "threshold = \"not a number\"\n").unwrap();
        reader.send("RELOAD").unwrap();
        let refused = expect(&mut reader, "NAK RELOAD");
        reader.send("TRIG").unwrap();
        let after_garbage = expect(&mut reader, "RES 1 ");

        let mut other = original.clone();
        other.model.sha256 = "0".repeat(64);
        other.threshold = f32::MIN_POSITIVE;
        other.scale.lo = -1.0;
        other.save(&cal_path).unwrap();
        reader.send("RELOAD").unwrap();
        let wrong_model = expect(&mut reader, "NAK RELOAD");
        reader.send("TRIG").unwrap();
        let after_wrong_model = expect(&mut reader, "RES 2 ");

        // A valid file takes effect: the threshold at the part's own score rejects it, where
        // that is plausible for the model (above its lowest validation score).
        let score: f32 = res_fields(&before).unwrap().2.parse().unwrap();
        let lowest = vigil::model_file::read_meta(&fixture().model)
            .unwrap()
            .validation
            .min;
        let mut strict = original.clone();
        // Below the score by more than its printed rounding.
        strict.threshold = (score - 1e-3 * score.abs().max(1.0)).max(lowest.next_up());
        strict.scale.lo = strict.threshold - 1.0;
        strict.scale.hi = strict.threshold + 1.0;
        strict.save(&cal_path).unwrap();
        reader.send("RELOAD").unwrap();
        let accepted = expect(&mut reader, "ACK RELOAD");
        reader.send("TRIG").unwrap();
        let after_valid = expect(&mut reader, "RES 3 ");
        stop.store(true, Ordering::Relaxed);
        (
            before,
            refused,
            after_garbage,
            wrong_model,
            after_wrong_model,
            accepted,
            after_valid,
        )
    });
    let (before, refused, after_garbage, wrong_model, after_wrong_model, accepted, after_valid) =
        log;
    let verdict_score = |l: &str| {
        let r = res_fields(l).unwrap();
        (r.1, r.2)
    };
    assert_eq!(verdict_score(&before), verdict_score(&after_garbage));
    assert_eq!(verdict_score(&before), verdict_score(&after_wrong_model));
    assert!(refused.contains("threshold"), "{refused}");
    assert!(wrong_model.contains("not for this model"), "{wrong_model}");
    let threshold: f32 = accepted.split_whitespace().nth(2).unwrap().parse().unwrap();
    let (verdict, score) = verdict_score(&after_valid);
    let score: f32 = score.parse().unwrap();
    let tolerance = 1e-4 * score.abs().max(1.0);
    if (score - threshold).abs() > tolerance {
        let expected = if score >= threshold { "NG" } else { "OK" };
        assert_eq!(verdict, expected, "{accepted} then {after_valid}");
    }
}

#[test]
fn empty_folder_reports_fault_and_recovers_when_parts_arrive() {
    let f = fixture();
    let dir = line_folder("empty", &[]);
    let cfg = config(&dir, &folder_source(&dir, false, 0.0));
    let (events_tx, events) = crossbeam_channel::unbounded();
    let hooks = Hooks {
        events: Some(events_tx),
        ..Hooks::default()
    };
    let (summary, seen) = with_station(cfg, Controls::default(), hooks, |_| {
        let mut seen = Vec::new();
        let fault = events.recv_timeout(Duration::from_secs(20)).unwrap();
        seen.push(fault);
        for (i, p) in f.good[..3].iter().enumerate() {
            std::fs::copy(p, dir.join("line").join(format!("{i:03}.png"))).unwrap();
        }
        while let Ok(e) = events.recv_timeout(Duration::from_secs(20)) {
            seen.push(e.clone());
            if e == Event::Ready {
                break;
            }
        }
        seen
    });
    assert!(
        matches!(&seen[0], Event::Fault(r) if r.contains("no image files")),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&Event::Ready));
    assert_eq!(summary.captured, 3);
    assert_eq!(summary.ok + summary.ng, 3);
}

/// A camera that delivers `before_drop` frames, drops, refuses `failed_reopens` reopen attempts,
/// then delivers `after` frames.
struct DroppingCamera {
    frames: u64,
    before_drop: u64,
    after: u64,
    failed_reopens: u32,
    dropped: bool,
    opens: u32,
    rng: Rng,
}

impl FrameSource for DroppingCamera {
    fn open(&mut self) -> Result<()> {
        self.opens += 1;
        if self.dropped && self.failed_reopens > 0 {
            self.failed_reopens -= 1;
            return Err(Error::Device("camera: no such device".into()));
        }
        Ok(())
    }

    fn grab(&mut self) -> Result<Option<(String, Frame)>> {
        if self.frames == self.before_drop && !self.dropped {
            self.dropped = true;
            return Err(Error::Device("camera: unplugged".into()));
        }
        if self.frames == self.before_drop + self.after {
            return Ok(None);
        }
        self.frames += 1;
        let cfg = SynthConfig {
            height: 80,
            width: 80,
            channels: 3,
            ..SynthConfig::default()
        };
        let (image, _) = synth::product(&cfg, &mut self.rng.fork(self.frames), None);
        Ok(Some((
            format!("frame{}", self.frames),
            Frame::Pixels(image),
        )))
    }
}

#[test]
fn dropped_camera_reports_fault_and_reconnects_with_back_off() {
    let dir = line_folder("camera", &[]);
    let cfg = config(&dir, &folder_source(&dir, false, 0.0));
    let (events_tx, events) = crossbeam_channel::unbounded();
    let camera = DroppingCamera {
        frames: 0,
        before_drop: 3,
        after: 3,
        failed_reopens: 2,
        dropped: false,
        opens: 0,
        rng: Rng::new(9),
    };
    let hooks = Hooks {
        source: Some(Box::new(camera)),
        events: Some(events_tx),
        ..Hooks::default()
    };
    let start = Instant::now();
    let summary = station::run(&cfg, &Controls::default(), hooks).unwrap();
    let seen: Vec<Event> = events.try_iter().collect();
    let faults: Vec<&Event> = seen
        .iter()
        .filter(|e| matches!(e, Event::Fault(_)))
        .collect();
    assert!(
        matches!(faults.first(), Some(Event::Fault(r)) if r.contains("unplugged")),
        "{seen:?}"
    );
    assert!(
        faults
            .iter()
            .any(|e| matches!(e, Event::Fault(r) if r.contains("no such device"))),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&Event::Ready), "{seen:?}");
    assert_eq!(summary.captured, 6);
    assert_eq!(summary.ok + summary.ng, 6, "{summary:?}");
    // Two refused reopens: 100 ms + 200 ms of back-off.
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[test]
fn sigterm_mid_stream_signals_every_part_in_flight_and_exits_zero() {
    let f = fixture();
    let dir = line_folder("sigterm", &f.good[..3]);
    let json = dir.join("results.jsonl");
    config(
        &dir,
        &format!(
            "{}[json]\npath = {:?}\n[status]\ninterval_s = 0.2\n",
            folder_source(&dir, true, 30.0),
            json.display().to_string()
        ),
    );
    // systemd's side of sd_notify, reading as systemd does while the service runs.
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let child_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let systemd = {
        let child_done = child_done.clone();
        std::thread::spawn(move || {
            let mut messages = Vec::new();
            let mut buf = [0u8; 512];
            loop {
                match notify.recv(&mut buf) {
                    Ok(n) => messages.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(_) if child_done.load(std::sync::atomic::Ordering::Relaxed) => {
                        return messages
                    }
                    Err(_) => {}
                }
            }
        })
    };
    let mut child = vigil_command()
        .args(["run", "--config"])
        .arg(dir.join("station.toml"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while json_lines(&json).len() < 6 {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no results within 60 s; vigil run said: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    child_done.store(true, std::sync::atomic::Ordering::Relaxed);
    let messages = systemd.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let results = json_lines(&json);
    let ids: Vec<u64> = results.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
    assert!(
        stdout.contains(&format!("stopped: {} parts captured", ids.len())),
        "{stdout} vs {} results",
        ids.len()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("status: fps"));
    let position = |m: &str| messages.iter().position(|x| x == m);
    assert!(position("READY=1").is_some(), "{messages:?}");
    assert!(position("WATCHDOG=1").is_some(), "{messages:?}");
    assert_eq!(
        messages.last().map(String::as_str),
        Some("STOPPING=1"),
        "{messages:?}"
    );
}

#[test]
fn rejected_parts_pulse_the_reject_line_and_land_in_the_audit_folder() {
    use vigil::station::gpio::OutputLine;
    let f = fixture();
    let parts: Vec<PathBuf> = f.defect.iter().chain(&f.good[..2]).cloned().collect();
    let dir = line_folder("gpio-audit", &parts);
    let json = dir.join("results.jsonl");
    let cfg = config(
        &dir,
        &format!(
            "{}[json]\npath = {:?}\n[gpio]\nreject_line = 1\nready_line = 2\nfault_line = 3\ndelay_ms = 150\npulse_ms = 20\n[audit]\ndir = {:?}\nmax_parts = 2\n",
            folder_source(&dir, false, 10.0),
            json.display().to_string(),
            dir.join("audit").display().to_string()
        ),
    );
    let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hooks = Hooks {
        gpio: Some(Box::new(RecordingGpio(changes.clone()))),
        ..Hooks::default()
    };
    let start = Instant::now();
    let summary = station::run(&cfg, &Controls::default(), hooks).unwrap();
    let results = json_lines(&json);
    assert_eq!(results.len(), parts.len());
    let rejected = results.iter().filter(|r| r["verdict"] != "OK").count();
    assert!(rejected >= 2, "{results:?}");
    let changes = changes.lock().unwrap();
    let rises: Vec<Duration> = changes
        .iter()
        .filter(|c| c.1 == OutputLine::Reject && c.2)
        .map(|c| c.0 - start)
        .collect();
    // A verdict later than the ejector delay fires no pulse (it would hit the next part) and is
    // counted instead: on a fast machine none is late, under emulation all may be.
    assert_eq!(
        summary.pulsed_rejects + summary.late_rejects,
        rejected as u64,
        "{changes:?}"
    );
    // Overlapping pulses merge into one rise (parts 100 ms apart and 20 ms pulses, unless a
    // starved source bunches them).
    let pulsed = summary.pulsed_rejects;
    assert!(
        rises.len() as u64 <= pulsed && rises.is_empty() == (pulsed == 0),
        "{changes:?}"
    );
    assert!(
        rises.iter().all(|t| *t >= Duration::from_millis(150)),
        "{rises:?}"
    );
    let falls = changes
        .iter()
        .filter(|c| c.1 == OutputLine::Reject && !c.2)
        .count();
    assert_eq!(falls, rises.len());
    assert!(changes.iter().any(|c| c.1 == OutputLine::Ready && c.2));
    // Bounded to two parts, three files each.
    let stored = std::fs::read_dir(dir.join("audit")).unwrap().count();
    assert_eq!(stored, 6);
    assert_eq!(summary.ng + summary.err, rejected as u64);
}

#[test]
fn teach_mode_stores_parts_from_the_station_source() {
    let f = fixture();
    let dir = line_folder("capture", &f.good[..4]);
    config(&dir, &folder_source(&dir, true, 0.0));
    let out = dir.join("taught");
    let stored = commands::station::capture(&dir.join("station.toml"), &out, 6).unwrap();
    assert_eq!(stored.len(), 6);
    // Looped: the fifth stored part is the first file again, byte for byte.
    assert_eq!(
        std::fs::read(&stored[4]).unwrap(),
        std::fs::read(dir.join("line/000.png")).unwrap()
    );
    let synthetic = dir.join("synthetic.toml");
    std::fs::write(
        &synthetic,
        "model = \"m\"\ncalibration = \"c\"\n[source]\nkind = \"synthetic\"\nheight = 32\nwidth = 32\n",
    )
    .unwrap();
    let frames = commands::station::capture(&synthetic, &dir.join("synth"), 2).unwrap();
    let img = vigil::data::image::load_image(
        &frames[1],
        &vigil::data::InputSpec {
            height: 32,
            width: 32,
            channels: 1,
        },
    )
    .unwrap();
    assert_eq!(img.data.len(), 32 * 32);
}
