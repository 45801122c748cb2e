//! The serial signal: result lines to the PLC, commands from it (docs/protocol.md).
//!
//! A writer thread owns the port and drains the serial output's own queue in order. While the
//! port is gone (cable pulled, USB adapter re-enumerated) or the PLC does not read, lines wait in
//! that queue, which drops its oldest and marks the gap (`LOST`) rather than hold up a stage; the
//! writer tells a slow reader from a lost port, and in acknowledged mode sends unacknowledged
//! results again after a reconnection. A reader thread per connection parses commands.
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serialport::SerialPort;

use super::config::SerialConfig;
use super::outputs::{SerialLine, SHUTDOWN_GRACE};
use super::protocol::{event_line, heartbeat_line, lost_line, parse_command, Command};
use super::queue::{DropQueue, Loss, Next};
use super::status::Stats;
use super::Event;
use crate::error::{Error, Result};

/// Read and write timeout of the port: how often the reader looks at its stop flag, and how
/// long one write may wait for room before the writer looks around.
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

/// Receives the PLC's commands (called from the reader thread; must not block).
pub type CommandSink = Arc<dyn Fn(Command) + Send + Sync>;

/// What the writer finds about its port.
#[derive(Clone, Debug, PartialEq)]
pub enum PortState {
    /// The port is gone (cable pulled, adapter re-enumerated, the other side closed it).
    Lost(String),
    /// The port is there but the PLC takes no bytes.
    Slow(String),
    /// Lines go out again.
    Fine,
}

/// Reports the port's state to the station (called from the writer thread; must not block).
pub type PortHealth = Arc<dyn Fn(PortState) + Send + Sync>;

/// A write that makes no progress for this long means the PLC stopped reading.
pub const SLOW_AFTER: Duration = Duration::from_secs(1);

/// What the writer needs besides its queue.
pub struct WriterContext {
    pub run: u64,
    pub stats: Arc<Stats>,
    pub commands: CommandSink,
    pub health: PortHealth,
    /// In acknowledged mode, every result id below this was acknowledged by the PLC.
    pub acked_below: Arc<AtomicU64>,
}

/// Starts the writer thread; it ends once `queue` is closed and written (or the port stayed
/// away, or the PLC stopped reading, for [`SHUTDOWN_GRACE`] after the close).
pub fn start(
    cfg: SerialConfig,
    queue: Arc<DropQueue<SerialLine>>,
    ctx: WriterContext,
) -> Result<JoinHandle<()>> {
    let writer = Writer::new(cfg, queue, ctx);
    std::thread::Builder::new()
        .name("signal-serial".into())
        .spawn(move || writer.run())
        .map_err(|e| Error::Device(format!("cannot start the serial writer: {e}")))
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

/// Longest command line kept; the rest of a longer line is ignored (its excerpt is NAKed).
const COMMAND_MAX: usize = 256;

/// Reads commands from `port` and hands each to `commands` until a read fails or `alive` is
/// cleared (the station's reader thread, and a capture's serial trigger).
pub(crate) fn read_commands(
    mut port: Box<dyn SerialPort>,
    alive: Arc<AtomicBool>,
    commands: CommandSink,
) {
    let mut buf = [0u8; 256];
    let mut line = Vec::with_capacity(64);
    while alive.load(Ordering::Relaxed) {
        match port.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for &b in &buf[..n] {
                    if b == b'\n' || b == b'\r' {
                        if let Some(cmd) = parse_command(&line) {
                            commands(cmd);
                        }
                        line.clear();
                    } else if line.len() < COMMAND_MAX {
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

fn own_line(text: String) -> SerialLine {
    SerialLine { text, id: None }
}

/// Owns the port: writes the queue's lines in order, one at a time, resuming a line where a
/// timed-out write left it (a PLC that stops reading gets no torn line).
struct Writer {
    cfg: SerialConfig,
    queue: Arc<DropQueue<SerialLine>>,
    ctx: WriterContext,
    conn: Option<Connection>,
    /// The line being written and how many of its bytes went out.
    in_hand: Option<(SerialLine, usize)>,
    /// The writer's own lines, sent before the queue: its FAULT notice, repeats and their gap.
    notices: VecDeque<SerialLine>,
    /// Results written but not acknowledged (acknowledged mode), oldest first.
    unacked: VecDeque<SerialLine>,
    /// Unacknowledged results that no longer fit `unacked` and cannot be sent again.
    unacked_lost: Loss,
    /// Why the port was lost, while it is away (reported once).
    lost: Option<String>,
    stalled_since: Option<Instant>,
    slow_reported: bool,
    next_attempt: Instant,
    next_heartbeat: Instant,
    heartbeat_seq: u64,
    /// Set when the queue closed: shutdown waits for a failing port this long.
    closed_at: Option<Instant>,
}

impl Writer {
    fn new(cfg: SerialConfig, queue: Arc<DropQueue<SerialLine>>, ctx: WriterContext) -> Writer {
        let now = Instant::now();
        Writer {
            cfg,
            queue,
            ctx,
            conn: None,
            in_hand: None,
            notices: VecDeque::new(),
            unacked: VecDeque::new(),
            unacked_lost: Loss::default(),
            lost: None,
            stalled_since: None,
            slow_reported: false,
            next_attempt: now,
            next_heartbeat: now,
            heartbeat_seq: 0,
            closed_at: None,
        }
    }

    fn heartbeat(&self) -> Option<Duration> {
        (self.cfg.heartbeat_s > 0.0).then(|| Duration::from_secs_f64(self.cfg.heartbeat_s))
    }

    fn run(mut self) {
        loop {
            if self.queue.is_closed() {
                let closed_at = *self.closed_at.get_or_insert_with(Instant::now);
                if self.in_hand.is_none() && self.notices.is_empty() && self.queue.is_empty() {
                    return;
                }
                if closed_at.elapsed() > SHUTDOWN_GRACE {
                    log::error!(
                        "serial port {} {} at shutdown: {} lines not delivered",
                        self.cfg.port.display(),
                        if self.conn.is_none() {
                            "away"
                        } else {
                            "not read"
                        },
                        self.queue.len() + self.notices.len() + usize::from(self.in_hand.is_some())
                    );
                    return;
                }
            }
            if self
                .conn
                .as_ref()
                .is_some_and(|c| !c.alive.load(Ordering::Relaxed))
            {
                self.port_lost("the port closed or failed to read".into());
            }
            if self.conn.is_none() {
                self.try_connect();
                if self.conn.is_none() {
                    // The queue keeps filling (and marks what it must drop) meanwhile.
                    let wait = self.next_attempt.saturating_duration_since(Instant::now());
                    std::thread::sleep(
                        wait.clamp(Duration::from_millis(1), Duration::from_millis(50)),
                    );
                    continue;
                }
            }
            if self.in_hand.is_none() {
                self.in_hand = self.next_line().map(|line| (line, 0));
            }
            if self.in_hand.is_some() {
                self.write_in_hand();
            }
        }
    }

    /// The next line to send, waiting briefly for one; a heartbeat when nothing waits.
    fn next_line(&mut self) -> Option<SerialLine> {
        if let Some(line) = self.notices.pop_front() {
            return Some(line);
        }
        let now = Instant::now();
        let wait = match self.heartbeat() {
            Some(_) => self.next_heartbeat.saturating_duration_since(now),
            None => Duration::from_millis(200),
        }
        .min(Duration::from_millis(200));
        match self.queue.pop_timeout(wait) {
            Some(Next::Entry(line)) => Some(line),
            Some(Next::Lost(loss)) => {
                self.ctx
                    .stats
                    .serial_dropped
                    .fetch_add(loss.count, Ordering::Relaxed);
                Some(own_line(lost_line(loss.count, loss.ids, self.ctx.run)))
            }
            Some(Next::Closed) => None,
            None => {
                let hb = self.heartbeat()?;
                if Instant::now() < self.next_heartbeat {
                    return None;
                }
                self.next_heartbeat = Instant::now() + hb;
                let ready = !self.ctx.stats.fault.load(Ordering::Relaxed);
                let line = heartbeat_line(
                    self.heartbeat_seq,
                    ready,
                    self.ctx.stats.counts(),
                    self.ctx.run,
                );
                self.heartbeat_seq += 1;
                Some(own_line(line))
            }
        }
    }

    fn try_connect(&mut self) {
        if Instant::now() < self.next_attempt {
            return;
        }
        match connect(&self.cfg, &self.ctx.commands) {
            Ok(c) => {
                self.conn = Some(c);
                if let Some(reason) = self.lost.take() {
                    log::info!("serial port {} is back", self.cfg.port.display());
                    self.mark_gap(&reason);
                    (self.ctx.health)(PortState::Fine);
                }
            }
            Err(e) => {
                self.next_attempt = Instant::now() + Duration::from_millis(self.cfg.reconnect_ms);
                if self.lost.is_none() {
                    log::warn!("{e}; {} lines queued", self.queue.len());
                    self.lost = Some(e.to_string());
                    (self.ctx.health)(PortState::Lost(e.to_string()));
                }
            }
        }
    }

    /// After a reconnection: the FAULT line of the gap first, then (acknowledged mode) every
    /// unacknowledged result again as `REP`, then what had not gone out yet: the writer's own
    /// lines still waiting (repeats, `LOST` lines; a connection can be lost again before they
    /// are written) and the line that was being written. Older `FAULT serial` notices are
    /// superseded by the new one.
    fn mark_gap(&mut self, reason: &str) {
        let mut notices = VecDeque::new();
        notices.push_back(own_line(event_line(
            &Event::Fault(format!("serial: {reason}")),
            self.ctx.run,
        )));
        if self.cfg.ack {
            self.prune_acked();
            if self.unacked_lost.count > 0 {
                let gap = std::mem::take(&mut self.unacked_lost);
                notices.push_back(own_line(lost_line(gap.count, gap.ids, self.ctx.run)));
            }
            for mut line in self.unacked.drain(..) {
                if let Some(rest) = line.text.strip_prefix("RES ") {
                    line.text = format!("REP {rest}");
                }
                notices.push_back(line);
            }
        }
        let waiting = std::mem::take(&mut self.notices);
        notices.extend(
            waiting
                .into_iter()
                .filter(|line| !line.text.starts_with("FAULT serial")),
        );
        if let Some((line, _)) = self.in_hand.take() {
            notices.push_back(line);
        }
        self.notices = notices;
    }

    fn prune_acked(&mut self) {
        let below = self.ctx.acked_below.load(Ordering::Relaxed);
        while self
            .unacked
            .front()
            .is_some_and(|l| l.id.is_some_and(|id| id < below))
        {
            self.unacked.pop_front();
        }
    }

    fn port_lost(&mut self, reason: String) {
        self.conn = None;
        self.next_attempt = Instant::now() + Duration::from_millis(self.cfg.reconnect_ms);
        // The whole line again on the next connection: its start went with the old one.
        if let Some((_, written)) = &mut self.in_hand {
            *written = 0;
        }
        self.stalled_since = None;
        self.slow_reported = false;
        if self.lost.is_none() {
            log::warn!("serial port {} lost: {reason}", self.cfg.port.display());
            (self.ctx.health)(PortState::Lost(format!("port lost: {reason}")));
            self.lost = Some(format!("port lost: {reason}"));
        }
    }

    fn write_in_hand(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let Some((line, written)) = self.in_hand.as_mut() else {
            return;
        };
        // No flush: tcdrain has no timeout and would hang on a PLC that stopped reading. A line
        // counts as sent once the kernel took it (docs/protocol.md says what that can lose).
        match conn.port.write(&line.text.as_bytes()[*written..]) {
            Ok(n) if n > 0 => {
                *written += n;
                self.stalled_since = None;
                if *written == line.text.len() {
                    if let Some((line, _)) = self.in_hand.take() {
                        self.sent(line);
                    }
                }
            }
            Ok(_) => self.stalled(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                self.stalled()
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => self.port_lost(e.to_string()),
        }
    }

    fn sent(&mut self, line: SerialLine) {
        if self.cfg.ack && line.id.is_some() {
            self.prune_acked();
            if self.unacked.len() == self.cfg.queue {
                if let Some(old) = self.unacked.pop_front() {
                    self.unacked_lost.add(old.id);
                }
            }
            self.unacked.push_back(line);
        }
        if self.slow_reported && self.notices.is_empty() && self.queue.is_empty() {
            log::info!(
                "serial port {}: the PLC reads again",
                self.cfg.port.display()
            );
            self.slow_reported = false;
            (self.ctx.health)(PortState::Fine);
        }
    }

    fn stalled(&mut self) {
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        if !self.slow_reported && since.elapsed() >= SLOW_AFTER {
            self.slow_reported = true;
            let reason = format!(
                "PLC not reading: no byte taken for {} ms, {} lines waiting",
                since.elapsed().as_millis(),
                self.queue.len()
            );
            log::warn!("serial port {}: {reason}", self.cfg.port.display());
            // Delivered when the PLC reads again, right after the line in hand.
            self.notices.push_front(own_line(event_line(
                &Event::Fault(format!("serial: {reason}")),
                self.ctx.run,
            )));
            (self.ctx.health)(PortState::Slow(reason));
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
