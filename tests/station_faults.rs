//! Fault injection, as an integrator would try the station: a PLC simulator on a pseudo-terminal
//! that floods commands, stops reading or pulls the cable; a result file on a full disk; hostile
//! frames, model and calibration files; config mistakes. One test (or more) per finding of the
//! issue "The station keeps its promise under faults".
mod crafted_png;
mod station_common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use station_common::*;
use vigil::calibration::Calibration;
use vigil::station::gpio::OutputLine;
use vigil::station::pty::{self, LineReader};
use vigil::station::{self, Controls, Event, Hooks, StationConfig};

/// Runs the station in a thread; panics if it has not returned `grace` after `controls.stop`
/// was set by `plc` (a frozen station must fail the test, not hang it).
fn run_bounded<T: Send>(
    cfg: StationConfig,
    controls: Controls,
    hooks: Hooks,
    grace: Duration,
    plc: impl FnOnce() -> T,
) -> (vigil::error::Result<station::Summary>, T) {
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let stop = controls.stop.clone();
    let station_thread = std::thread::spawn(move || {
        let result = station::run(&cfg, &controls, hooks);
        let _ = done_tx.send(());
        result
    });
    let seen = plc();
    stop.store(true, Ordering::Relaxed);
    assert!(
        done_rx.recv_timeout(grace).is_ok(),
        "the station did not stop within {grace:?} of being asked: frozen"
    );
    (station_thread.join().unwrap(), seen)
}

/// Makes a pty master's writes non-blocking: a PLC simulator must not hang on a station that
/// stopped reading.
fn nonblocking(file: &std::fs::File) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        assert!(flags >= 0);
        assert_eq!(
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK),
            0
        );
    }
}

fn serial_section(port: &Path, extra: &str) -> String {
    format!(
        "[serial]\nport = {:?}\nheartbeat_s = 0\nreconnect_ms = 50\n{extra}",
        port.display().to_string()
    )
}

/// Finding 1: a PLC that sends a burst of commands while not reading its replies froze the whole
/// station (the serial writer blocked on the queue only it drains), reject pulses included.
#[test]
fn a_plc_flooding_commands_without_reading_cannot_stall_the_reject_signal() {
    let f = fixture();
    let parts: Vec<PathBuf> = f.defect.iter().chain(&f.good[..2]).cloned().collect();
    let dir = line_folder("flood", &parts);
    let json = dir.join("results.jsonl");
    let pair = pty::open().unwrap();
    let cfg = config(
        &dir,
        &format!(
            "{}{}[json]\npath = {:?}\n[gpio]\nreject_line = 1\ndelay_ms = 300\npulse_ms = 5\n",
            folder_source(&dir, true, 20.0),
            serial_section(&pair.port, "queue = 50\n"),
            json.display().to_string()
        ),
    );
    let changes = Arc::new(Mutex::new(Vec::new()));
    let hooks = Hooks {
        gpio: Some(Box::new(RecordingGpio(changes.clone()))),
        ..Hooks::default()
    };
    let mut master = pair.master;
    nonblocking(&master);
    let (summary, ()) = run_bounded(
        cfg,
        Controls::default(),
        hooks,
        Duration::from_secs(10),
        || {
            // 4 s of PING and TRIG bursts; the replies are never read.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(4) {
                for _ in 0..50 {
                    let _ = master.write(b"PING\r\nTRIG\r\nSTATUS\r\n");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        },
    );
    let summary = summary.unwrap();
    let results = json_lines(&json);
    let ids: Vec<u64> = results.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
    // About 80 parts at 20 per second; a frozen station decides a handful.
    assert!(results.len() >= 40, "only {} results", results.len());
    let rejected = results.iter().filter(|r| r["verdict"] != "OK").count() as u64;
    let rises = changes
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.1 == OutputLine::Reject && c.2)
        .count() as u64;
    // Every rejected part is pulsed or, if its verdict came later than the ejector delay, counted
    // as late. Pulses that overlap merge (parts 50 ms apart, but a starved thread can bunch
    // them), so the line rises at most once per pulsed part.
    assert!(rejected > 0, "{results:?}");
    assert_eq!(summary.pulsed_rejects + summary.late_rejects, rejected);
    assert!(rises <= summary.pulsed_rejects && (rises > 0) == (summary.pulsed_rejects > 0));
    assert_eq!(summary.ok + summary.ng + summary.err, summary.captured);
}

/// Finding 2: with `trigger = serial`, READY=1 reached systemd only after the first TRIG, so an
/// idle line after boot was killed and restarted in a loop.
#[test]
fn readiness_comes_from_the_self_test_not_from_the_first_part() {
    let f = fixture();
    let dir = line_folder("ready", &f.good[..1]);
    let pair = pty::open().unwrap();
    config(
        &dir,
        &format!(
            "[trigger]\nkind = \"serial\"\n{}{}",
            folder_source(&dir, true, 0.0),
            serial_section(&pair.port, "")
        ),
    );
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut child = vigil_command()
        .args(["run", "--config"])
        .arg(dir.join("station.toml"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = LineReader::new(pair.master);
    let start = Instant::now();
    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    while !messages.iter().any(|m| m == "READY=1") && start.elapsed() < Duration::from_secs(60) {
        if let Ok(n) = notify.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
        }
    }
    let mut log = Vec::new();
    let ready_line = if messages.iter().any(|m| m == "READY=1") {
        Some(expect_line(
            &mut reader,
            "READY",
            Duration::from_secs(10),
            &mut log,
        ))
    } else {
        None
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        messages.iter().any(|m| m == "READY=1"),
        "no READY=1 without a trigger: {messages:?}"
    );
    assert!(ready_line.is_some(), "{log:?}");
    assert!(status.success());
}

/// The ids of every result line and every `LOST` range a PLC read.
fn delivered(lines: &[String]) -> (Vec<u64>, Vec<(u64, u64)>) {
    let mut ids = Vec::new();
    let mut gaps = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["RES" | "REP", id, ..] => ids.push(id.parse().unwrap()),
            ["LOST", _, range, ..] => {
                if let Some((a, b)) = range.split_once('-') {
                    gaps.push((a.parse().unwrap(), b.parse().unwrap()));
                }
            }
            _ => {}
        }
    }
    (ids, gaps)
}

/// Finding 3: a queue overflow while the port was away evicted the `FAULT serial` marker itself
/// and left an unmarked gap.
#[test]
fn an_overflow_while_the_port_is_away_is_marked_and_keeps_the_fault_line() {
    let f = fixture();
    let parts: Vec<PathBuf> = f.good.iter().cycle().take(30).cloned().collect();
    let dir = line_folder("overflow", &parts);
    let link = dir.join("port");
    let first = pty::open().unwrap();
    std::os::unix::fs::symlink(&first.port, &link).unwrap();
    let cfg = config(
        &dir,
        &format!(
            "{}{}",
            folder_source(&dir, false, 20.0),
            serial_section(&link, "queue = 4\n")
        ),
    );
    let (_, lines) = with_station(cfg, Controls::default(), Hooks::default(), |done| {
        let mut lines = Vec::new();
        let mut reader = LineReader::new(first.master);
        expect_line(&mut reader, "RES 2 ", Duration::from_secs(30), &mut lines);
        while let Some(line) = reader.read_line(Duration::from_millis(20)) {
            lines.push(line);
        }
        drop(reader);
        std::fs::remove_file(&link).unwrap();
        // About 20 parts go by: far more than the queue of 4 holds.
        std::thread::sleep(Duration::from_millis(1000));
        let second = pty::open().unwrap();
        std::os::unix::fs::symlink(&second.port, &link).unwrap();
        let mut reader = LineReader::new(second.master);
        read_all(&mut reader, done, &mut lines);
        lines
    });
    let fault = lines.iter().position(|l| l.starts_with("FAULT serial"));
    let lost = lines.iter().position(|l| l.starts_with("LOST "));
    assert!(fault.is_some() && lost.is_some(), "{lines:?}");
    assert!(fault < lost, "the FAULT line comes first: {lines:?}");
    let (ids, gaps) = delivered(&lines);
    for id in 0..30u64 {
        assert!(
            ids.contains(&id) || gaps.iter().any(|&(a, b)| a <= id && id <= b),
            "part {id} neither delivered nor inside a LOST range: {lines:?}"
        );
    }
}

/// Finding 3: ids restarted at 0 after every restart with nothing to tell the runs apart.
#[test]
fn a_run_identifier_tells_restarts_apart() {
    let f = fixture();
    let dir = line_folder("runs", &f.good[..2]);
    let state = dir.join("state");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let pair = pty::open().unwrap();
        let cfg = config(
            &dir,
            &format!(
                "state_dir = {:?}\n{}{}",
                state.display().to_string(),
                folder_source(&dir, false, 0.0),
                serial_section(&pair.port, "")
            ),
        );
        let mut reader = LineReader::new(pair.master);
        let (_, lines) = with_station(cfg, Controls::default(), Hooks::default(), |done| {
            let mut lines = Vec::new();
            read_all(&mut reader, done, &mut lines);
            lines
        });
        seen.push(lines);
    }
    let run_of = |lines: &[String]| -> (u64, Vec<u64>) {
        let ready = lines
            .iter()
            .find(|l| l.starts_with("READY"))
            .expect("READY");
        let run: u64 = ready
            .split_whitespace()
            .nth(1)
            .expect("READY <run>")
            .parse()
            .unwrap();
        let res_runs = lines
            .iter()
            .filter(|l| l.starts_with("RES "))
            .map(|l| l.split_whitespace().nth(5).unwrap().parse().unwrap())
            .collect();
        (run, res_runs)
    };
    let (first, first_res) = run_of(&seen[0]);
    let (second, second_res) = run_of(&seen[1]);
    assert_eq!(second, first + 1, "{seen:?}");
    assert_eq!(first_res, vec![first; 2]);
    assert_eq!(second_res, vec![second; 2]);
}

/// Finding 3: result lines the kernel had taken but the PLC had not read died with an unplugged
/// port. In acknowledged mode they are sent again, marked as repeats.
#[test]
fn acknowledged_mode_sends_unacknowledged_results_again_after_a_reconnect() {
    let f = fixture();
    let parts: Vec<PathBuf> = f.good.iter().cycle().take(16).cloned().collect();
    let dir = line_folder("ack", &parts);
    let link = dir.join("port");
    let first = pty::open().unwrap();
    std::os::unix::fs::symlink(&first.port, &link).unwrap();
    let cfg = config(
        &dir,
        &format!(
            "{}{}",
            folder_source(&dir, false, 8.0),
            serial_section(&link, "ack = true\n")
        ),
    );
    let (_, (lines, repeats)) = with_station(cfg, Controls::default(), Hooks::default(), |done| {
        let mut lines = Vec::new();
        let mut reader = LineReader::new(first.master);
        expect_line(&mut reader, "RES 2 ", Duration::from_secs(30), &mut lines);
        reader.send("ACK 2").unwrap();
        // Results 3 and 4 arrive but are never acknowledged; then the cable goes, with whatever
        // the kernel still held for the PLC.
        expect_line(&mut reader, "RES 4 ", Duration::from_secs(30), &mut lines);
        drop(reader);
        std::fs::remove_file(&link).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        let second = pty::open().unwrap();
        std::os::unix::fs::symlink(&second.port, &link).unwrap();
        let mut reader = LineReader::new(second.master);
        let mut after = Vec::new();
        read_all(&mut reader, done, &mut after);
        let repeats: Vec<u64> = after
            .iter()
            .filter(|l| l.starts_with("REP "))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect();
        lines.extend(after);
        (lines, repeats)
    });
    assert!(
        repeats.contains(&3) && repeats.contains(&4),
        "unacknowledged 3 and 4 sent again: {lines:?}"
    );
    assert!(
        repeats.iter().all(|&id| id >= 3),
        "acknowledged results are not repeated: {lines:?}"
    );
    let (ids, gaps) = delivered(&lines);
    assert!(gaps.is_empty(), "{lines:?}");
    for id in 0..16u64 {
        assert!(ids.contains(&id), "part {id} missing: {lines:?}");
    }
}

/// Finding 4: no limit on decoded image size (a small PNG decoded to gigabytes and blocked
/// preprocessing for seconds, so the good parts behind it missed their deadline).
#[test]
fn an_oversized_frame_is_refused_from_its_header_at_once() {
    let f = fixture();
    let dir = line_folder(
        "oversized",
        &[f.good[0].clone(), f.good[1].clone(), f.good[2].clone()],
    );
    std::fs::write(
        dir.join("line/001.png"),
        crafted_png::claimed_png(30_000, 30_000),
    )
    .unwrap();
    let json = dir.join("results.jsonl");
    let cfg = config(
        &dir,
        &format!(
            "{}[decision]\ndeadline_ms = 3000\n[json]\npath = {:?}\n",
            folder_source(&dir, false, 0.0),
            json.display().to_string()
        ),
    );
    let summary = station::run(&cfg, &Controls::default(), Hooks::default()).unwrap();
    let results = json_lines(&json);
    assert_eq!(results.len(), 3);
    let reason = results[1]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("input.max_width"), "{:?}", results[1]);
    assert!(
        results[1]["timings_ms"]["preprocess"].as_f64().unwrap() < 100.0,
        "{:?}",
        results[1]
    );
    for r in [&results[0], &results[2]] {
        assert!(r["score"].is_number(), "{r:?}");
    }
    assert_eq!(summary.failures, 1);
}

fn write_calibration(dir: &Path, threshold: f32) -> PathBuf {
    let mut cal = Calibration::load(&fixture().calibration).unwrap();
    cal.threshold = threshold;
    cal.scale.lo = threshold - threshold.abs().max(1.0);
    cal.scale.hi = threshold + threshold.abs().max(1.0);
    let path = dir.join("implausible.toml");
    cal.save(&path).unwrap();
    path
}

/// Finding 5: a threshold that passes everything (1e30), or one at or below the defect-free
/// scores (rejects everything), was accepted.
#[test]
fn an_implausible_threshold_is_refused_naming_both_numbers() {
    let f = fixture();
    let dir = line_folder("implausible", &f.good[..1]);
    let lowest = vigil::model_file::read_meta(&f.model)
        .unwrap()
        .validation
        .min;
    for threshold in [1e30f32, 0.0, lowest] {
        let mut cfg = config(&dir, &folder_source(&dir, false, 0.0));
        cfg.calibration = write_calibration(&dir, threshold);
        let err = station::run(&cfg, &Controls::default(), Hooks::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("plausible") && err.contains("calibration"),
            "threshold {threshold}: {err:?}"
        );
    }
}

/// Finding 5: the model file had no checksum of its own; an altered weight loaded silently.
#[test]
fn a_model_file_altered_after_training_is_refused() {
    let f = fixture();
    let dir = line_folder("altered", &f.good[..1]);
    let mut bytes = std::fs::read(&f.model).unwrap();
    // A byte of the last tensor's data, far from the header.
    let at = bytes.len() - 3;
    bytes[at] ^= 0x10;
    let altered = dir.join("altered.safetensors");
    std::fs::write(&altered, bytes).unwrap();
    let mut cfg = config(&dir, &folder_source(&dir, false, 0.0));
    cfg.model = altered;
    let err = station::run(&cfg, &Controls::default(), Hooks::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("checksum"), "{err:?}");
}

/// Finding 6: a full disk dropped JSON result lines with a WARN only.
#[test]
fn a_result_file_on_a_full_disk_raises_a_fault() {
    let f = fixture();
    let dir = line_folder("full-disk", &f.good[..3]);
    let cfg = config(
        &dir,
        &format!(
            "{}[json]\npath = \"/dev/full\"\n",
            folder_source(&dir, false, 0.0)
        ),
    );
    let (events_tx, events) = crossbeam_channel::unbounded();
    let hooks = Hooks {
        events: Some(events_tx),
        ..Hooks::default()
    };
    let summary = station::run(&cfg, &Controls::default(), hooks).unwrap();
    let seen: Vec<Event> = events.try_iter().collect();
    let last_state = seen
        .iter()
        .rev()
        .find(|e| matches!(e, Event::Ready | Event::Fault(_)));
    assert!(
        matches!(last_state, Some(Event::Fault(r)) if r.starts_with("json") && r.contains("/dev/full")),
        "{seen:?}"
    );
    assert_eq!(summary.captured, 3);
}

/// A writer that fails its first `failures` writes (a disk that fills, then is cleaned up).
struct FlakyDisk {
    failures: usize,
    written: Arc<Mutex<Vec<u8>>>,
}

impl Write for FlakyDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failures > 0 {
            self.failures -= 1;
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.written.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Finding 6: the failing writer standing in for a full disk. FAULT while it fails, READY when it
/// writes again, and every result line there, in order, none torn.
#[test]
fn a_result_writer_that_fails_then_recovers_faults_and_loses_nothing() {
    let f = fixture();
    let dir = line_folder("flaky-disk", &f.good[..4]);
    let cfg = config(&dir, &folder_source(&dir, false, 0.0));
    let written = Arc::new(Mutex::new(Vec::new()));
    let (events_tx, events) = crossbeam_channel::unbounded();
    let hooks = Hooks {
        json: Some(Box::new(FlakyDisk {
            failures: 5,
            written: written.clone(),
        })),
        events: Some(events_tx),
        ..Hooks::default()
    };
    let summary = station::run(&cfg, &Controls::default(), hooks).unwrap();
    let seen: Vec<Event> = events.try_iter().collect();
    let fault = seen
        .iter()
        .position(|e| matches!(e, Event::Fault(r) if r.starts_with("json")));
    assert!(fault.is_some(), "{seen:?}");
    assert!(
        seen[fault.unwrap()..].contains(&Event::Ready),
        "READY after the disk writes again: {seen:?}"
    );
    let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
    let ids: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a whole JSON line"))
        .filter_map(|v| v["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert_eq!(summary.json_failed, 5);
    assert_eq!(summary.json_lost, 0);
}

/// Finding 6: a deleted audit folder disabled auditing until restart.
#[test]
fn a_deleted_audit_folder_is_made_again() {
    let f = fixture();
    let parts: Vec<PathBuf> = f.defect.iter().cycle().take(8).cloned().collect();
    let dir = line_folder("audit-deleted", &parts);
    let audit = dir.join("audit");
    let json = dir.join("results.jsonl");
    let cfg = config(
        &dir,
        &format!(
            "{}[json]\npath = {:?}\n[audit]\ndir = {:?}\nmin_free_bytes = 0\n",
            folder_source(&dir, false, 4.0),
            json.display().to_string(),
            audit.display().to_string()
        ),
    );
    let (_, ()) = with_station(cfg, Controls::default(), Hooks::default(), |_| {
        let start = Instant::now();
        while std::fs::read_dir(&audit).map_or(0, |d| d.count()) == 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "nothing audited");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_dir_all(&audit).unwrap();
    });
    let results = json_lines(&json);
    let rejected_late = results
        .iter()
        .skip(4)
        .filter(|r| r["verdict"] != "OK")
        .count();
    assert!(rejected_late > 0, "{results:?}");
    let kept = std::fs::read_dir(&audit).map_or(0, |d| d.count());
    assert!(kept > 0, "the audit folder was not made again");
}

/// Finding 7: config mistakes that ran anyway, aborted the process, or busy-looped a core, and
/// a missing file whose error did not name its key.
#[test]
fn config_mistakes_are_refused_naming_the_key() {
    let base = "model = \"m.safetensors\"\ncalibration = \"c.toml\"\n[source]\nkind = \"folder\"\npath = \"parts\"\n";
    for (extra, key) in [
        ("[trigger]\nkind = \"free-run\"\nline = 17\n", "line"),
        ("[pipeline]\nqueue = 100000000000\n", "pipeline.queue"),
        (
            "[serial]\nport = \"/dev/ttyS0\"\nreconnect_ms = 0\n",
            "serial.reconnect_ms",
        ),
    ] {
        let err = StationConfig::parse(&format!("{base}{extra}"), "station.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(key), "{extra:?}: {err:?}");
    }
    let f = fixture();
    let dir = line_folder("missing-model", &f.good[..1]);
    let mut cfg = config(&dir, &folder_source(&dir, false, 0.0));
    cfg.model = dir.join("no-such-model.safetensors");
    let err = station::run(&cfg, &Controls::default(), Hooks::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("`model`") && err.contains("no-such-model"),
        "{err:?}"
    );
}

/// Finding 8: a NAK echoed raw control and non-ASCII bytes back to the PLC.
#[test]
fn a_nak_echoes_only_a_short_escaped_excerpt() {
    let f = fixture();
    let dir = line_folder("nak", &f.good[..1]);
    let pair = pty::open().unwrap();
    let cfg = config(
        &dir,
        &format!(
            "[trigger]\nkind = \"serial\"\n{}{}",
            folder_source(&dir, true, 0.0),
            serial_section(&pair.port, "")
        ),
    );
    // The master stays open until the station has returned: a station retrying a closed
    // port's path could reach another test's pseudo-terminal once its number is reused.
    let master = pair.master;
    let (_, nak) = run_bounded(
        cfg,
        Controls::default(),
        Hooks::default(),
        Duration::from_secs(10),
        || {
            let mut log = Vec::new();
            let mut reader = LineReader::new(master.try_clone().unwrap());
            expect_line(&mut reader, "READY", Duration::from_secs(30), &mut log);
            let mut hostile = b"EJ\x07\x1b[2J\xff\xfe ".to_vec();
            hostile.extend(std::iter::repeat_n(b'A', 100));
            hostile.extend_from_slice(b"\r\n");
            (&master).write_all(&hostile).unwrap();
            expect_line(&mut reader, "NAK", Duration::from_secs(10), &mut log)
        },
    );
    assert!(
        nak.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "not printable ASCII: {nak:?}"
    );
    assert!(nak.len() <= 80, "{nak:?}");
}

/// Finding 8: a slow reader was reported as a lost port (FAULT/READY pairs many times a second).
#[test]
fn a_plc_that_stops_reading_is_told_apart_from_a_lost_port() {
    let f = fixture();
    let dir = line_folder("slow-reader", &f.good[..2]);
    let pair = pty::open().unwrap();
    let cfg = config(
        &dir,
        &format!(
            "{}{}",
            folder_source(&dir, true, 20.0),
            serial_section(&pair.port, "")
        ),
    );
    let (events_tx, events) = crossbeam_channel::unbounded();
    let hooks = Hooks {
        events: Some(events_tx),
        ..Hooks::default()
    };
    let master = pair.master;
    let (_, lines) = run_bounded(
        cfg,
        Controls::default(),
        hooks,
        Duration::from_secs(10),
        || {
            let mut lines = Vec::new();
            let mut reader = LineReader::new(master.try_clone().unwrap());
            expect_line(&mut reader, "READY", Duration::from_secs(30), &mut lines);
            // Fill the line with replies nobody reads, then read nothing for 4 s.
            let writer = master.try_clone().unwrap();
            nonblocking(&writer);
            // The input side holds a few hundred PINGs at a time: keep writing for a while (a
            // full buffer refuses the write) so the replies outgrow the output side however the
            // station's reads interleave.
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(1500) {
                if (&writer).write(b"PING\r\n").is_err() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            std::thread::sleep(Duration::from_secs(4));
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Some(line) = reader.read_line(Duration::from_millis(50)) {
                    lines.push(line);
                }
            }
            lines
        },
    );
    let seen: Vec<Event> = events.try_iter().collect();
    let serial_faults: Vec<&String> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Fault(r) if r.starts_with("serial") => Some(r),
            _ => None,
        })
        .collect();
    assert!(
        !serial_faults.is_empty() && serial_faults.len() <= 2,
        "{serial_faults:?}"
    );
    assert!(
        serial_faults.iter().all(|r| r.contains("not reading")),
        "a slow reader is not a lost port: {serial_faults:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("FAULT serial: PLC not reading")),
        "{:?}",
        &lines[lines.len().saturating_sub(20)..]
    );
}

/// Finding 8: a calibration replaced with the same modification time was never seen by the poll.
#[test]
fn a_calibration_replaced_with_its_old_modification_time_is_reloaded() {
    let f = fixture();
    let dir = line_folder("same-mtime", &f.good[..1]);
    let cal_path = dir.join("calibration.toml");
    std::fs::copy(&f.calibration, &cal_path).unwrap();
    let pair = pty::open().unwrap();
    let mut cfg = config(
        &dir,
        &format!(
            "[trigger]\nkind = \"serial\"\n{}[decision]\nreload_poll_ms = 100\n{}",
            folder_source(&dir, true, 0.0),
            serial_section(&pair.port, "")
        ),
    );
    cfg.calibration = cal_path.clone();
    let mut reader = LineReader::new(pair.master);
    let (_, ack) = run_bounded(
        cfg,
        Controls::default(),
        Hooks::default(),
        Duration::from_secs(10),
        || {
            let mut log = Vec::new();
            expect_line(&mut reader, "READY", Duration::from_secs(30), &mut log);
            let mtime = std::fs::metadata(&cal_path).unwrap().modified().unwrap();
            let mut cal = Calibration::load(&cal_path).unwrap();
            cal.threshold = (cal.threshold + cal.scale.hi) / 2.0;
            cal.save(&cal_path).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&cal_path)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
            expect_line(&mut reader, "ACK RELOAD", Duration::from_secs(5), &mut log)
        },
    );
    assert!(ack.starts_with("ACK RELOAD "), "{ack}");
}
