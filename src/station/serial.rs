//! The serial signal: result lines to the PLC, commands from it (docs/protocol.md).
//!
//! A writer thread owns the port and a bounded, in-order queue of lines: a line leaves the queue
//! only once written, so while the port is gone (cable pulled, USB adapter re-enumerated) results
//! wait and go out in order when it is back. A reader thread per connection parses commands.
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serialport::SerialPort;

use super::config::SerialConfig;
use super::protocol::{heartbeat_line, parse_command, Command};
use super::status::Stats;
use crate::error::{Error, Result};

/// How long queued lines may wait for a lost port at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
const READ_POLL: Duration = Duration::from_millis(100);

pub fn open_port(cfg: &SerialConfig) -> Result<Box<dyn SerialPort>> {
    let parity = match cfg.parity.as_str() {
        "even" => serialport::Parity::Even,
        "odd" => serialport::Parity::Odd,
        _ => serialport::Parity::None,
    };
    serialport::new(cfg.port.to_string_lossy(), cfg.baud)
        .data_bits(if cfg.data_bits == 7 {
            serialport::DataBits::Seven
        } else {
            serialport::DataBits::Eight
        })
        .parity(parity)
        .stop_bits(if cfg.stop_bits == 2 {
            serialport::StopBits::Two
        } else {
            serialport::StopBits::One
        })
        .timeout(READ_POLL)
        .open()
        .map_err(|e| Error::Device(format!("serial port {}: {e}", cfg.port.display())))
}

/// Receives the PLC's commands (called from the reader thread).
pub type CommandSink = Arc<dyn Fn(Command) + Send + Sync>;

/// Reports the port lost (`Some(reason)`) or back (`None`).
pub type PortHealth = Arc<dyn Fn(Option<String>) + Send + Sync>;

pub struct SerialSignal {
    pub handle: JoinHandle<()>,
}

/// Starts the writer thread; it ends once `lines` is closed and its queue is written (or the
/// port stayed away for [`SHUTDOWN_GRACE`]).
pub fn start(
    cfg: SerialConfig,
    lines: Receiver<String>,
    stats: Arc<Stats>,
    commands: CommandSink,
    health: PortHealth,
) -> SerialSignal {
    let handle = std::thread::Builder::new()
        .name("signal-serial".into())
        .spawn(move || writer(cfg, lines, stats, commands, health))
        .expect("spawn serial thread");
    SerialSignal { handle }
}

struct Connection {
    port: Box<dyn SerialPort>,
    /// Cleared by the reader on a read error, and by the writer to stop the reader.
    alive: Arc<AtomicBool>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

fn connect(cfg: &SerialConfig, commands: &CommandSink) -> Result<Connection> {
    let port = open_port(cfg)?;
    let reader = port
        .try_clone()
        .map_err(|e| Error::Device(format!("serial port {}: {e}", cfg.port.display())))?;
    let alive = Arc::new(AtomicBool::new(true));
    let (flag, sink) = (alive.clone(), commands.clone());
    std::thread::Builder::new()
        .name("serial-reader".into())
        .spawn(move || read_commands(reader, flag, sink))
        .map_err(|e| Error::Device(format!("cannot start serial reader: {e}")))?;
    Ok(Connection { port, alive })
}

fn read_commands(mut port: Box<dyn SerialPort>, alive: Arc<AtomicBool>, commands: CommandSink) {
    let mut buf = [0u8; 256];
    let mut line = Vec::with_capacity(64);
    while alive.load(Ordering::Relaxed) {
        match port.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for &b in &buf[..n] {
                    if b == b'\n' || b == b'\r' {
                        if let Some(cmd) = parse_command(&String::from_utf8_lossy(&line)) {
                            commands(cmd);
                        }
                        line.clear();
                    } else if line.len() < 256 {
                        line.push(b);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    alive.store(false, Ordering::Relaxed);
}

fn writer(
    cfg: SerialConfig,
    lines: Receiver<String>,
    stats: Arc<Stats>,
    commands: CommandSink,
    health: PortHealth,
) {
    let mut queue: VecDeque<String> = VecDeque::with_capacity(cfg.queue.min(4096));
    let mut conn: Option<Connection> = None;
    let reconnect = Duration::from_millis(cfg.reconnect_ms);
    let heartbeat = (cfg.heartbeat_s > 0.0).then(|| Duration::from_secs_f64(cfg.heartbeat_s));
    let mut next_attempt = Instant::now();
    let mut next_heartbeat = Instant::now();
    let mut heartbeat_seq = 0u64;
    let mut closing_since: Option<Instant> = None;
    let mut lost_reported = false;
    let push = |queue: &mut VecDeque<String>, line: String| {
        if queue.len() == cfg.queue {
            queue.pop_front();
            stats
                .serial_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        queue.push_back(line);
    };
    loop {
        let now = Instant::now();
        let mut wake = now + Duration::from_millis(200);
        if conn.is_none() {
            wake = wake.min(next_attempt);
        }
        if let Some(hb) = heartbeat {
            wake = wake.min(next_heartbeat.max(now + hb / 8));
        }
        if closing_since.is_none() {
            match lines.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(line) => push(&mut queue, line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing_since = Some(Instant::now()),
            }
            while let Ok(line) = lines.try_recv() {
                push(&mut queue, line);
            }
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        if conn
            .as_ref()
            .is_some_and(|c| !c.alive.load(Ordering::Relaxed))
        {
            conn = None;
            next_attempt = Instant::now();
        }
        if conn.is_none() && Instant::now() >= next_attempt {
            match connect(&cfg, &commands) {
                Ok(c) => {
                    conn = Some(c);
                    if lost_reported {
                        log::info!("serial port {} is back", cfg.port.display());
                        health(None);
                        lost_reported = false;
                    }
                }
                Err(e) => {
                    if !lost_reported {
                        log::warn!("{e}; {} result lines queued", queue.len());
                        health(Some(e.to_string()));
                        lost_reported = true;
                    }
                    next_attempt = Instant::now() + reconnect;
                }
            }
        }
        if let Some(c) = &mut conn {
            if let Some(hb) = heartbeat {
                if Instant::now() >= next_heartbeat && queue.is_empty() {
                    let ready = !stats.fault.load(Ordering::Relaxed);
                    queue.push_back(heartbeat_line(heartbeat_seq, ready, stats.counts()));
                    heartbeat_seq += 1;
                    next_heartbeat = Instant::now() + hb;
                }
            }
            while let Some(line) = queue.front() {
                let written = c
                    .port
                    .write_all(line.as_bytes())
                    .and_then(|_| c.port.flush());
                match written {
                    Ok(()) => {
                        queue.pop_front();
                    }
                    Err(e) => {
                        log::warn!("serial port {} lost: {e}", cfg.port.display());
                        health(Some(format!("serial port lost: {e}")));
                        lost_reported = true;
                        conn = None;
                        next_attempt = Instant::now() + reconnect;
                        break;
                    }
                }
            }
        }
        if let Some(since) = closing_since {
            if queue.is_empty() {
                break;
            }
            if since.elapsed() > SHUTDOWN_GRACE {
                log::error!(
                    "serial port {} away at shutdown: {} result lines not delivered",
                    cfg.port.display(),
                    queue.len()
                );
                break;
            }
        }
    }
}
