//! Soak: the station at full rate while a simulated PLC misbehaves at random — stops reading,
//! floods commands, pulls the cable and plugs it back — in acknowledged mode. Checks that every
//! part got exactly one verdict (JSON), that every result the PLC did not receive lies inside a
//! marked `LOST` range, and that memory stays flat. Not part of CI (minutes).
//!
//! `cargo bench --bench station_soak -- [MODEL] [CALIBRATION] [parts] [seed]`
//! (the demo's `runs/demo/model.safetensors` and `runs/demo/calibration.toml`, 20,000 parts).
use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil::rng::Rng;
use vigil::station::config::StationConfig;
use vigil::station::pty::{self, LineReader};
use vigil::station::{self, Controls, Hooks};

/// What the simulated PLC did and read.
#[derive(Default)]
struct PlcLog {
    results: BTreeSet<u64>,
    repeats: u64,
    gaps: Vec<(u64, u64)>,
    lost_lines: u64,
    faults: u64,
    unplugs: u64,
    floods: u64,
    stalls: u64,
}

impl PlcLog {
    fn take(&mut self, line: &str, last_id: &mut Option<u64>) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [word @ ("RES" | "REP"), id, ..] => {
                if let Ok(id) = id.parse::<u64>() {
                    self.results.insert(id);
                    *last_id = Some(id);
                    if *word == "REP" {
                        self.repeats += 1;
                    }
                }
            }
            ["LOST", _, range, ..] => {
                self.lost_lines += 1;
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                        self.gaps.push((a, b));
                    }
                }
            }
            ["FAULT", ..] => self.faults += 1,
            _ => {}
        }
    }
}

fn plug(link: &Path) -> LineReader {
    let pair = pty::open().expect("pty");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&pair.port, link).expect("symlink");
    // SAFETY: fcntl on a descriptor we own; floods must not block the PLC on a full line.
    unsafe {
        let fd = pair.master.as_raw_fd();
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        );
    }
    LineReader::new(pair.master)
}

fn plc(link: PathBuf, seed: u64, done: Arc<AtomicBool>) -> PlcLog {
    let mut rng = Rng::new(seed);
    let mut log = PlcLog::default();
    let mut reader = plug(&link);
    let mut last_id = None;
    let mut acked = None;
    while !done.load(Ordering::Relaxed) {
        let roll = rng.range_usize(0, 100);
        if roll < 80 {
            // Read normally for a while, acknowledging what arrived.
            let until = Instant::now() + Duration::from_millis(rng.range_usize(100, 600) as u64);
            while Instant::now() < until {
                if let Some(line) = reader.read_line(Duration::from_millis(20)) {
                    log.take(&line, &mut last_id);
                }
                if last_id != acked {
                    if let Some(id) = last_id {
                        let _ = reader.send(&format!("ACK {id}"));
                        acked = last_id;
                    }
                }
            }
        } else if roll < 88 {
            log.stalls += 1;
            std::thread::sleep(Duration::from_millis(rng.range_usize(500, 3000) as u64));
        } else if roll < 94 {
            log.floods += 1;
            let mut file = reader.into_file();
            for _ in 0..500 {
                let _ = file.write(b"PING\r\nSTATUS\r\nTRIG\r\n");
            }
            reader = LineReader::new(file);
        } else {
            log.unplugs += 1;
            drop(reader);
            let _ = std::fs::remove_file(&link);
            std::thread::sleep(Duration::from_millis(rng.range_usize(200, 1500) as u64));
            reader = plug(&link);
        }
    }
    // The station has finished: read what is left.
    while let Some(line) = reader.read_line(Duration::from_millis(500)) {
        log.take(&line, &mut last_id);
    }
    log
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let model = args
        .first()
        .map_or("runs/demo/model.safetensors", String::as_str);
    let calibration = args
        .get(1)
        .map_or("runs/demo/calibration.toml", String::as_str);
    let parts: u64 = args.get(2).map_or(Ok(20_000), |a| a.parse())?;
    let seed: u64 = args.get(3).map_or(Ok(1), |a| a.parse())?;
    let meta = vigil::model_file::read_meta(Path::new(model))?;
    let dir = tempfile::tempdir()?;
    let link = dir.path().join("plc-port");
    let json = dir.path().join("results.jsonl");
    let text = format!(
        "model = {model:?}\ncalibration = {calibration:?}\nstate_dir = {state:?}\n\
         [source]\nkind = \"synthetic\"\nheight = {h}\nwidth = {w}\nchannels = {c}\n\
         defect_rate = 0.2\ncount = {parts}\nseed = {seed}\n\
         [decision]\ndeadline_ms = 2000\nreload_poll_ms = 0\n\
         [serial]\nport = {port:?}\nack = true\nheartbeat_s = 0.5\nqueue = 2000\nreconnect_ms = 50\n\
         [json]\npath = {json:?}\n[status]\ninterval_s = 0\n",
        model = std::path::absolute(model)?.display().to_string(),
        calibration = std::path::absolute(calibration)?.display().to_string(),
        state = dir.path().display().to_string(),
        h = meta.input.height,
        w = meta.input.width,
        c = meta.input.channels,
        port = link.display().to_string(),
        json = json.display().to_string(),
    );
    let cfg = StationConfig::parse(&text, "soak station")?;
    let done = Arc::new(AtomicBool::new(false));
    let plc_thread = {
        let (link, done) = (link.clone(), done.clone());
        std::thread::spawn(move || plc(link, seed, done))
    };
    let rss = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let (rss, done) = (rss.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                rss.lock().map(|mut r| r.push(vigil::bench::rss_kib())).ok();
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let start = Instant::now();
    let summary = station::run(&cfg, &Controls::default(), Hooks::default())?;
    let seconds = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let log = plc_thread
        .join()
        .map_err(|_| anyhow::anyhow!("PLC thread panicked"))?;
    let _ = sampler.join();

    let ids: Vec<u64> = std::fs::read_to_string(&json)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_u64())
        .collect();
    let one_verdict_each = ids == (0..parts).collect::<Vec<_>>();
    let unmarked: Vec<u64> = (0..parts)
        .filter(|id| {
            !log.results.contains(id) && !log.gaps.iter().any(|&(a, b)| a <= *id && *id <= b)
        })
        .collect();
    let marked =
        (0..parts).filter(|id| !log.results.contains(id)).count() as u64 - unmarked.len() as u64;
    let rss = rss.lock().map(|r| r.clone()).unwrap_or_default();
    let settled = rss.len().min(5);
    let (first, peak, last) = (
        rss.get(settled).copied().unwrap_or(0),
        rss.iter().skip(settled).max().copied().unwrap_or(0),
        rss.last().copied().unwrap_or(0),
    );
    println!(
        "station soak: {parts} parts, seed {seed}, {}x{}x{} {} model",
        meta.input.channels, meta.input.height, meta.input.width, meta.method
    );
    println!(
        "  {seconds:.1} s, {:.0} parts/s; OK {} NG {} ERR {}, deadline {} drops {}",
        parts as f64 / seconds,
        summary.ok,
        summary.ng,
        summary.err,
        summary.deadline_misses,
        summary.drops
    );
    println!(
        "  PLC: {} unplugs, {} floods of 1500 commands, {} reading stalls; read {} FAULT lines",
        log.unplugs, log.floods, log.stalls, log.faults
    );
    println!(
        "  results: {} received (REP lines {}), {} not received but inside {} LOST lines, {} unmarked",
        log.results.len(),
        log.repeats,
        marked,
        log.lost_lines,
        unmarked.len()
    );
    println!(
        "  exactly one verdict per part in the JSON file: {}",
        if one_verdict_each { "yes" } else { "NO" }
    );
    println!("  RSS after {settled} s {first} KiB, peak {peak} KiB, at the end {last} KiB");
    if !one_verdict_each || !unmarked.is_empty() {
        anyhow::bail!(
            "soak failed: {} unmarked results (first {:?})",
            unmarked.len(),
            &unmarked[..unmarked.len().min(10)]
        );
    }
    Ok(())
}
