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

/// Opens and configures the port. serialport sets the line through the `termios2` ioctls; where
/// the kernel or an emulator lacks them (qemu-user before 10.2, gVisor, WSL1: "Function not
/// implemented"), the port is configured through the classic termios calls instead, which cover
/// the standard baud rates.
pub fn open_port(cfg: &SerialConfig) -> Result<Box<dyn SerialPort>> {
    let parity = match cfg.parity.as_str() {
        "even" => serialport::Parity::Even,
        "odd" => serialport::Parity::Odd,
        _ => serialport::Parity::None,
    };
    let opened = serialport::new(cfg.port.to_string_lossy(), cfg.baud)
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
        .open();
    let e = match opened {
        Ok(port) => return Ok(port),
        Err(e) => e,
    };
    if lacks_termios2(&e) {
        if let Ok(port) = open_classic_termios(cfg) {
            log::warn!(
                "serial port {}: {e}; configured with classic termios instead",
                cfg.port.display()
            );
            return Ok(port);
        }
    }
    Err(Error::Device(format!(
        "serial port {}: {e}",
        cfg.port.display()
    )))
}

/// Whether serialport failed for want of the `termios2` ioctls (`ENOSYS`, `ENOTTY`; it reports
/// both as `Unknown` with the errno's text). Any other failure (busy, absent, no permission)
/// must not be retried another way: a port locked by another process stays locked.
fn lacks_termios2(e: &serialport::Error) -> bool {
    e.kind() == serialport::ErrorKind::Unknown
        && ["Function not implemented", "Inappropriate ioctl for device"]
            .iter()
            .any(|text| e.description.contains(text))
}

/// The same raw 8N1/7E1-style line as serialport's, set with `tcsetattr` (`TCSETS`).
fn open_classic_termios(cfg: &SerialConfig) -> std::io::Result<Box<dyn SerialPort>> {
    use std::ffi::CString;
    use std::io::{Error as IoError, ErrorKind};
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let speed = match cfg.baud {
        1200 => libc::B1200,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        921600 => libc::B921600,
        other => {
            return Err(IoError::new(
                ErrorKind::Unsupported,
                format!("baud {other} is not a standard rate"),
            ))
        }
    };
    let path = CString::new(cfg.port.as_os_str().as_bytes())
        .map_err(|_| IoError::new(ErrorKind::InvalidInput, "NUL in the port path"))?;
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(IoError::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: plain libc calls on a descriptor this function owns (closed by `OwnedFd` on error)
    // and on a termios struct it initialises with `tcgetattr` before use.
    unsafe {
        let fd = check(libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let mut t: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(raw, &mut t))?;
        libc::cfmakeraw(&mut t);
        t.c_cflag |= libc::CREAD | libc::CLOCAL;
        t.c_cflag &= !(libc::CSIZE | libc::PARENB | libc::PARODD | libc::CSTOPB | libc::CRTSCTS);
        t.c_cflag |= if cfg.data_bits == 7 {
            libc::CS7
        } else {
            libc::CS8
        };
        match cfg.parity.as_str() {
            "even" => t.c_cflag |= libc::PARENB,
            "odd" => t.c_cflag |= libc::PARENB | libc::PARODD,
            _ => {}
        }
        if cfg.stop_bits == 2 {
            t.c_cflag |= libc::CSTOPB;
        }
        check(libc::cfsetispeed(&mut t, speed))?;
        check(libc::cfsetospeed(&mut t, speed))?;
        check(libc::tcsetattr(raw, libc::TCSANOW, &t))?;
        // Blocking I/O from here on; serialport polls with its timeout before each read/write.
        check(libc::fcntl(raw, libc::F_SETFL, 0))?;
        let mut port = serialport::TTYPort::from_raw_fd(fd.into_raw_fd());
        port.set_timeout(READ_POLL)?;
        Ok(Box::new(port))
    }
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::*;
    use crate::station::pty::{self, LineReader};

    fn config(port: &std::path::Path, extra: &str) -> SerialConfig {
        toml::from_str(&format!("port = {:?}\n{extra}", port.display().to_string())).unwrap()
    }

    #[test]
    fn classic_termios_sets_the_line_and_carries_lines() {
        let pair = pty::open().unwrap();
        let cfg = config(&pair.port, "baud = 9600\nstop_bits = 2");
        let mut port = open_classic_termios(&cfg).unwrap();
        // A pty master reports its slave's settings: the port's line as configured (a pty
        // forces 8 data bits without parity, so those two cannot be checked here).
        // SAFETY: termios is plain data, filled by tcgetattr before it is read.
        let t = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(pair.master.as_raw_fd(), &mut t), 0);
            t
        };
        assert_ne!(t.c_cflag & libc::CSTOPB, 0);
        // SAFETY: reads a field of the struct above.
        assert_eq!(unsafe { libc::cfgetospeed(&t) }, libc::B9600);
        assert_eq!(t.c_lflag & (libc::ICANON | libc::ECHO), 0, "raw mode");

        port.write_all(b"RES 7 OK 0.125 3.0\r\n").unwrap();
        port.flush().unwrap();
        let mut reader = LineReader::new(pair.master);
        assert_eq!(
            reader.read_line(Duration::from_secs(5)).as_deref(),
            Some("RES 7 OK 0.125 3.0")
        );
    }

    #[test]
    fn only_a_missing_termios2_falls_back() {
        use serialport::{Error as PortError, ErrorKind};
        let missing = PortError::new(ErrorKind::Unknown, "Function not implemented");
        assert!(lacks_termios2(&missing));
        let not_a_tty = PortError::new(ErrorKind::Unknown, "Inappropriate ioctl for device");
        assert!(lacks_termios2(&not_a_tty));
        // Held by another process: must stay an error, never be opened a second way.
        assert!(!lacks_termios2(&PortError::new(
            ErrorKind::NoDevice,
            "Device or resource busy"
        )));
        let absent = PortError::new(ErrorKind::Io(std::io::ErrorKind::NotFound), "No such file");
        assert!(!lacks_termios2(&absent));
    }

    #[test]
    fn classic_termios_refuses_a_nonstandard_baud_and_a_missing_port() {
        let pair = pty::open().unwrap();
        let err = open_classic_termios(&config(&pair.port, "baud = 12345"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("12345"), "{err}");
        let missing = config(std::path::Path::new("/dev/vigil-no-such-port"), "");
        assert!(open_classic_termios(&missing).is_err());
        let err = open_port(&missing).err().unwrap().to_string();
        assert!(err.contains("/dev/vigil-no-such-port"), "{err}");
    }
}
