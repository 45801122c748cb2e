//! Station pieces that need no model: config validation, the line protocol, reject-pulse timing,
//! the audit folder's bounds, the stall check.
mod station_decided;

use std::time::{Duration, Instant, SystemTime};

use station_decided::decided;
use vigil::error::Result;
use vigil::station::audit::Audit;
use vigil::station::gpio::{GpioOutputs, OutputLine, RejectTimer};
use vigil::station::protocol::{self, Command};
use vigil::station::status::{StallCheck, Stats};
use vigil::station::{Event, StationConfig, Verdict};

const MINIMAL: &str = "model = \"m.safetensors\"\ncalibration = \"c.toml\"\n[source]\nkind = \"folder\"\npath = \"parts\"\n";

fn config_error(extra: &str) -> String {
    StationConfig::parse(&format!("{MINIMAL}{extra}"), "station.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn config_errors_name_the_key() {
    assert!(StationConfig::parse(MINIMAL, "station.toml").is_ok());
    let e = config_error("[decision]\ndeadline_ms = 0\n");
    assert!(e.contains("decision.deadline_ms"), "{e}");
    let e = config_error("[serial]\nport = \"/dev/ttyS0\"\nparity = \"mark\"\n");
    assert!(e.contains("serial.parity") && e.contains("mark"), "{e}");
    let e = config_error("[trigger]\nkind = \"serial\"\n");
    assert!(e.contains("trigger.kind"), "{e}");
    let e = config_error("[gpio]\nreject_line = 3\ndelay_counts = 10\n");
    assert!(e.contains("gpio.encoder_line"), "{e}");
    let e = config_error("[decision]\ndeadline = 5\n");
    assert!(e.contains("deadline"), "unknown key must be named: {e}");
    let e = StationConfig::parse(
        "model = \"m\"\ncalibration = \"c\"\n[source]\nkind = \"synthetic\"\nchannels = 2\n",
        "x.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("source.channels"), "{e}");
    let e = StationConfig::parse("model = \"m\"\n", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("calibration"), "{e}");
    let ok = StationConfig::parse(
        &format!("{MINIMAL}[decision]\non_failure = \"err\"\n"),
        "x.toml",
    )
    .unwrap();
    assert_eq!(
        ok.decision.on_failure,
        vigil::station::config::OnFailure::Err
    );
}

#[test]
fn the_examples_shipped_in_systemd_parse() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/station.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    StationConfig::parse(&text, "systemd/station.toml").unwrap();
    let cal = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/example.toml");
    vigil::calibration::Calibration::load(&cal).unwrap();
}

/// A station file with `source` as its `[source]` table, then `extra`.
fn config_with_source(source: &str, extra: &str) -> vigil::error::Result<StationConfig> {
    StationConfig::parse(
        &format!("model = \"m\"\ncalibration = \"c\"\n[source]\n{source}\n{extra}"),
        "station.toml",
    )
}

const FOLDER: &str = "kind = \"folder\"\npath = \"parts\"";
const SYNTHETIC: &str = "kind = \"synthetic\"";
const CAMERA: &str = "kind = \"camera\"\nwidth = 640\nheight = 480";
const SERIAL: &str = "[serial]\nport = \"/dev/ttyS0\"\n";
const GPIO: &str = "[gpio]\nreject_line = 3\ndelay_ms = 10\n";
const AUDIT: &str = "[audit]\ndir = \"audit\"\n";

#[test]
fn unit_like_triggers_refuse_unknown_keys() {
    let e = config_error("[trigger]\nkind = \"free-run\"\nline = 17\n");
    assert!(e.contains("unknown field") && e.contains("line"), "{e}");
    let e = config_error(&format!(
        "[trigger]\nkind = \"serial\"\nchip = \"x\"\n{SERIAL}"
    ));
    assert!(e.contains("unknown field") && e.contains("chip"), "{e}");
    // Without stray keys both still parse, and free-run is the default.
    let free =
        StationConfig::parse(&format!("{MINIMAL}[trigger]\nkind = \"free-run\"\n"), "x").unwrap();
    assert_eq!(
        free.trigger,
        vigil::station::config::TriggerConfig::default()
    );
    let serial = StationConfig::parse(
        &format!("{MINIMAL}[trigger]\nkind = \"serial\"\n{SERIAL}"),
        "x",
    )
    .unwrap();
    assert_eq!(
        serial.trigger,
        vigil::station::config::TriggerConfig::Serial
    );
}

#[test]
fn every_table_refuses_unknown_keys() {
    let tables: &[(&str, &str)] = &[
        (FOLDER, ""),
        (SYNTHETIC, ""),
        (CAMERA, ""),
        (FOLDER, "[trigger]\nkind = \"gpio\"\nline = 4\n"),
        (FOLDER, "[input]\n"),
        (FOLDER, "[decision]\n"),
        (FOLDER, "[pipeline]\n"),
        (FOLDER, SERIAL),
        (FOLDER, "[json]\npath = \"-\"\n"),
        (FOLDER, GPIO),
        (FOLDER, AUDIT),
        (FOLDER, "[status]\n"),
    ];
    for (source, table) in tables {
        // The stray key goes into the last table of the file.
        let e = config_with_source(source, &format!("{table}\nstray_key = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stray_key"), "{source} {table}: {e}");
        config_with_source(source, table).unwrap();
    }
    let e = StationConfig::parse(&format!("stray_key = 1\n{MINIMAL}"), "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("stray_key"), "{e}");
}

#[test]
fn errors_inside_kind_tables_name_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        (CAMERA, "device = 0.5", "`device`"),
        (FOLDER, "rate_hz = \"fast\"", "`rate_hz`"),
        ("path = \"parts\"", "", "`kind`"),
        ("kind = 3", "", "`kind`"),
        ("kind = \"floppy\"", "", "`kind`"),
        (FOLDER, "[trigger]\nkind = \"gpio\"\nline = \"x\"", "`line`"),
        (FOLDER, "[trigger]\nline = 4", "`kind`"),
    ];
    for (source, extra, key) in cases {
        let e = config_with_source(&format!("{source}\n{extra}"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{source} {extra}: {e}");
    }
}

#[test]
fn sizes_and_intervals_out_of_bounds_are_refused_with_key_and_bound() {
    // (source table, rest of the file, key named, bound named)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("rate_hz = -1.0", "", "source.rate_hz", "0..=10000"),
        ("rate_hz = 10001.0", "", "source.rate_hz", "0..=10000"),
        ("rate_hz = inf", "", "source.rate_hz", "0..=10000"),
        ("rate_hz = nan", "", "source.rate_hz", "0..=10000"),
        ("[pipeline]\nqueue = 0", "", "pipeline.queue", "1..=1024"),
        (
            "[pipeline]\nqueue = 100000000000",
            "",
            "pipeline.queue",
            "1..=1024",
        ),
        (
            "[decision]\ndeadline_ms = 0",
            "",
            "decision.deadline_ms",
            "1..=600000",
        ),
        (
            "[decision]\ndeadline_ms = 600001",
            "",
            "decision.deadline_ms",
            "1..=600000",
        ),
        (
            "[decision]\nreload_poll_ms = 49",
            "",
            "decision.reload_poll_ms",
            "50..=3600000",
        ),
        (
            "[decision]\nreload_poll_ms = 3600001",
            "",
            "decision.reload_poll_ms",
            "50..=3600000",
        ),
        ("[input]\nmax_width = 0", "", "input.max_width", "1..=65535"),
        (
            "[input]\nmax_width = 65536",
            "",
            "input.max_width",
            "1..=65535",
        ),
        (
            "[input]\nmax_height = 65536",
            "",
            "input.max_height",
            "1..=65535",
        ),
        (
            "[input]\nmax_bytes = 1048575",
            "",
            "input.max_bytes",
            "1048576..=17179869184",
        ),
        (
            "[input]\nmax_bytes = 17179869185",
            "",
            "input.max_bytes",
            "1048576..=17179869184",
        ),
        (SERIAL, "queue = 0", "serial.queue", "1..=1000000"),
        (SERIAL, "queue = 1000001", "serial.queue", "1..=1000000"),
        (
            SERIAL,
            "reconnect_ms = 0",
            "serial.reconnect_ms",
            "10..=60000",
        ),
        (
            SERIAL,
            "reconnect_ms = 60001",
            "serial.reconnect_ms",
            "10..=60000",
        ),
        (
            SERIAL,
            "heartbeat_s = 0.01",
            "serial.heartbeat_s",
            "0.05..=3600",
        ),
        (
            SERIAL,
            "heartbeat_s = 3601.0",
            "serial.heartbeat_s",
            "0.05..=3600",
        ),
        (
            SERIAL,
            "heartbeat_s = nan",
            "serial.heartbeat_s",
            "0.05..=3600",
        ),
        (SERIAL, "baud = 49", "serial.baud", "50..=4000000"),
        (SERIAL, "baud = 4000001", "serial.baud", "50..=4000000"),
        (GPIO, "pulse_ms = 0", "gpio.pulse_ms", "1..=10000"),
        (GPIO, "pulse_ms = 10001", "gpio.pulse_ms", "1..=10000"),
        (
            "[gpio]\nreject_line = 3",
            "delay_ms = 600001",
            "gpio.delay_ms",
            "0..=600000",
        ),
        (
            "[gpio]\nreject_line = 3\nencoder_line = 4",
            "delay_counts = 0",
            "gpio.delay_counts",
            "minimum 1",
        ),
        (AUDIT, "max_parts = 0", "audit.max_parts", "1..=10000000"),
        (
            AUDIT,
            "max_parts = 10000001",
            "audit.max_parts",
            "1..=10000000",
        ),
        (AUDIT, "max_bytes = 0", "audit.max_bytes", "minimum 1"),
        (
            AUDIT,
            "min_free_bytes = 1099511627777",
            "audit.min_free_bytes",
            "0..=1099511627776",
        ),
        (
            "[status]\ninterval_s = 0.05",
            "",
            "status.interval_s",
            "0.1..=86400",
        ),
        (
            "[status]\ninterval_s = 86401.0",
            "",
            "status.interval_s",
            "0.1..=86400",
        ),
        (
            "[status]\ninterval_s = -inf",
            "",
            "status.interval_s",
            "0.1..=86400",
        ),
    ];
    for (table, line, key, bound) in cases {
        let e = config_error(&format!("{table}\n{line}\n"));
        assert!(e.contains(key) && e.contains(bound), "{table} {line}: {e}");
    }
    let sources: &[(&str, &str, &str)] = &[
        ("height = 8193", "source.height", "16..=8192"),
        ("height = 15", "source.height", "16..=8192"),
        ("width = 8193", "source.width", "16..=8192"),
    ];
    for (line, key, bound) in sources {
        let e = config_with_source(&format!("{SYNTHETIC}\n{line}"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(bound), "{line}: {e}");
    }
    let cameras: &[(&str, &str, &str)] = &[
        ("width = 0", "source.width", "1..=16384"),
        ("width = 16385", "source.width", "1..=16384"),
        ("height = 16385", "source.height", "1..=16384"),
        ("fps = 0", "source.fps", "1..=1000"),
        ("fps = 1001", "source.fps", "1..=1000"),
    ];
    for (line, key, bound) in cameras {
        let camera = CAMERA
            .lines()
            .filter(|l| l.split(' ').next() != line.split(' ').next())
            .collect::<Vec<_>>()
            .join("\n");
        let e = config_with_source(&format!("{camera}\n{line}"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(bound), "{line}: {e}");
    }
}

#[test]
fn bounds_are_inclusive_and_zero_switches_intervals_off() {
    let accepted = [
        "rate_hz = 10000.0\n[pipeline]\nqueue = 1024\n[decision]\ndeadline_ms = 600000\nreload_poll_ms = 0\n[status]\ninterval_s = 0.0\n",
        "[decision]\nreload_poll_ms = 50\n[status]\ninterval_s = 86400.0\n[input]\nmax_bytes = 1048576\nmax_width = 65535\n",
        &format!("{SERIAL}heartbeat_s = 0.0\nreconnect_ms = 10\nqueue = 1000000\nbaud = 4000000\n"),
        &format!("{SERIAL}heartbeat_s = 3600.0\nreconnect_ms = 60000\nbaud = 50\n"),
        "[gpio]\nreject_line = 3\ndelay_ms = 600000\npulse_ms = 10000\n",
        &format!("{AUDIT}max_parts = 10000000\nmin_free_bytes = 1099511627776\n"),
    ];
    for extra in accepted {
        StationConfig::parse(&format!("{MINIMAL}{extra}"), "x.toml")
            .unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
    config_with_source(&format!("{SYNTHETIC}\nheight = 8192\nwidth = 16"), "").unwrap();
    config_with_source(
        "kind = \"camera\"\nwidth = 16384\nheight = 1\nfps = 1000",
        "",
    )
    .unwrap();
}

#[test]
fn the_new_keys_have_their_defaults() {
    let cfg = StationConfig::parse(&format!("{MINIMAL}{SERIAL}{AUDIT}"), "x.toml").unwrap();
    assert_eq!(cfg.state_dir, None);
    assert_eq!(
        cfg.input,
        vigil::station::config::InputConfig {
            max_width: 8192,
            max_height: 8192,
            max_bytes: 256 << 20,
        }
    );
    assert!(!cfg.serial.unwrap().ack);
    assert_eq!(cfg.audit.unwrap().min_free_bytes, 256 << 20);
    let e = StationConfig::parse(&format!("state_dir = \"\"\n{MINIMAL}"), "x.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("state_dir"), "{e}");
}

#[test]
fn state_dir_is_taken_from_the_station_files_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("station.toml");
    std::fs::write(&path, format!("state_dir = \"state\"\n{MINIMAL}")).unwrap();
    let cfg = StationConfig::load(&path).unwrap();
    assert_eq!(cfg.state_dir, Some(dir.path().join("state")));
    std::fs::write(&path, format!("state_dir = \"/var/lib/vigil\"\n{MINIMAL}")).unwrap();
    let cfg = StationConfig::load(&path).unwrap();
    assert_eq!(cfg.state_dir, Some("/var/lib/vigil".into()));
}

#[test]
fn protocol_lines_are_single_ascii_lines() {
    let mut line = String::new();
    protocol::result_line(
        &decided(7, Verdict::Ok, Some(0.5), None),
        3,
        false,
        &mut line,
    );
    assert!(line.starts_with("RES 7 OK 0.500000 "), "{line}");
    assert!(line.ends_with(" 3\r\n"), "{line}");
    protocol::result_line(
        &decided(8, Verdict::Ng, None, Some("cannot decode\né\nx")),
        3,
        true,
        &mut line,
    );
    assert!(line.starts_with("REP 8 NG - "), "{line}");
    assert_eq!(line.matches('\n').count(), 1, "{line:?}");
    assert!(line.is_ascii());
    assert_eq!(
        protocol::heartbeat_line(3, true, [1, 2, 3], 4),
        "HB 3 READY 1 2 3 4\r\n"
    );
    assert_eq!(
        protocol::event_line(&Event::Fault("source: gone".into()), 4),
        "FAULT source: gone\r\n"
    );
    assert_eq!(protocol::event_line(&Event::Ready, 4), "READY 4\r\n");
    assert_eq!(
        protocol::lost_line(3, Some((10, 12)), 4),
        "LOST 3 10-12 4\r\n"
    );
    assert_eq!(protocol::parse_command(b" trig\r"), Some(Command::Trigger));
    assert_eq!(protocol::parse_command(b"RELOAD"), Some(Command::Reload));
    assert_eq!(protocol::parse_command(b"ack 12"), Some(Command::Ack(12)));
    assert_eq!(protocol::parse_command(b""), None);
    let Some(Command::Bad { excerpt, reason }) = protocol::parse_command(b"EJ\x07\xff CT") else {
        panic!("EJECT is not a command");
    };
    assert_eq!(
        protocol::nak_line(&excerpt, &reason),
        "NAK EJ\\x07\\xFF\\x20CT unknown command\r\n"
    );
}

/// Records every output change with the time (or position) it happened at.
#[derive(Default)]
struct Recorder {
    now: u64,
    changes: Vec<(u64, OutputLine, bool)>,
}

impl GpioOutputs for Recorder {
    fn set(&mut self, line: OutputLine, high: bool) -> Result<()> {
        self.changes.push((self.now, line, high));
        Ok(())
    }
}

fn drive(timer: &mut RejectTimer, out: &mut Recorder, until: u64, pos_of: impl Fn(u64) -> u64) {
    while out.now <= until {
        let now = out.now;
        timer.poll(pos_of(now), now, out).unwrap();
        out.now += 100;
    }
}

#[test]
fn reject_pulse_follows_the_time_delay_and_width() {
    // Delay 20 ms, width 5 ms; parts captured at 0 and 1 ms (overlapping pulses merge).
    let mut timer = RejectTimer::new(20_000, Duration::from_millis(5));
    let mut out = Recorder::default();
    assert!(timer.reject(0, 2_000));
    assert!(timer.reject(1_000, 2_000));
    drive(&mut timer, &mut out, 40_000, |t| t);
    assert_eq!(
        out.changes,
        vec![
            (20_000, OutputLine::Reject, true),
            (26_000, OutputLine::Reject, false)
        ]
    );
    // One rise, two parts pulsed.
    assert_eq!(timer.pulsed, 2);
    // A verdict after its part passed the ejector fires nothing and is counted.
    assert!(!timer.reject(0, 30_000));
    assert_eq!((timer.pulsed, timer.late), (2, 1));
}

#[test]
fn reject_pulse_follows_encoder_counts_whatever_the_belt_speed() {
    // Delay 50 counts; the belt runs 1 count per ms, then stops, then runs 2 counts per ms.
    let belt = |t_us: u64| -> u64 {
        let ms = t_us / 1000;
        match ms {
            0..=29 => ms,
            30..=59 => 30,
            _ => 30 + 2 * (ms - 60),
        }
    };
    let mut timer = RejectTimer::new(50, Duration::from_millis(3));
    let mut out = Recorder::default();
    assert!(timer.reject(10, belt(12_000)));
    drive(&mut timer, &mut out, 120_000, belt);
    // Count 60 is reached at 75 ms (30 + 2 * 15).
    assert_eq!(
        out.changes,
        vec![
            (75_000, OutputLine::Reject, true),
            (78_000, OutputLine::Reject, false)
        ]
    );
    assert_eq!(timer.next_change_us(out.now, false), None);
}

#[test]
fn audit_folder_keeps_the_newest_parts_within_its_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let image = vigil::data::Image::zeros(1, 16, 16);
    let mut audit = Audit::open(dir.path(), 3, 1 << 30, 0, 16 * 16 * 4).unwrap();
    for id in 0..5 {
        let mut d = decided(id, Verdict::Ng, Some(1.0), None);
        d.captured_wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + id);
        d.evidence = Some((image.clone(), vec![0.5; 256], (0.0, 1.0)));
        audit.store(&d, "{}").unwrap();
    }
    assert_eq!(audit.parts(), 3);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 9, "{names:?}");
    assert!(names[0].ends_with("-00000002-heatmap.png"), "{names:?}");
    // Reopened with a byte bound below what is there: the oldest go until it fits.
    let total = audit.bytes();
    drop(audit);
    let audit = Audit::open(dir.path(), 10, total - 1, 0, 16 * 16 * 4).unwrap();
    assert_eq!(audit.parts(), 2);
    assert!(!dir.path().join(&names[0]).exists());
}

#[test]
fn a_stage_with_parts_waiting_and_no_progress_is_stalled() {
    let stats = Stats::new();
    let mut check = StallCheck::new();
    assert_eq!(check.stalled(&stats), None);
    stats.passed(0);
    stats.passed(1);
    // Preprocessing handed a part on: inference may be working on it...
    assert_eq!(check.stalled(&stats), None);
    // ... but not for a whole interval.
    assert_eq!(check.stalled(&stats), Some("inference"));
    stats.passed(2);
    stats.passed(3);
    stats.passed(4);
    assert_eq!(check.stalled(&stats), None);
    assert_eq!(check.stalled(&stats), None);
}

#[test]
fn encoder_count_at_a_past_instant_leaves_out_later_edges() {
    let encoder = vigil::station::gpio::Encoder::default();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    for ms in [1, 2, 3, 10, 11] {
        encoder.edge(at(ms));
    }
    assert_eq!(encoder.count(), 5);
    assert_eq!(encoder.count_at(at(5)), 3);
    assert_eq!(encoder.count_at(at(0)), 0);
    assert_eq!(encoder.count_at(at(20)), 5);
}
