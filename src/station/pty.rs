//! Pseudo-terminal pairs: the demo and the tests put the serial signal on one, the way a PLC
//! would see it on a real port.
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The controlling side of a pseudo-terminal and the path of its serial side (`/dev/pts/N`).
pub struct PtyPair {
    pub master: File,
    pub port: PathBuf,
}

/// Opens a pair in raw mode (no echo, no line editing, no CR/LF translation). The master is
/// close-on-exec from the start: a process started meanwhile must not inherit it, or closing
/// ours would no longer hang up the serial side (a "pulled cable" would go unnoticed).
pub fn open() -> Result<PtyPair> {
    let fail = |what: &str| Error::Device(format!("{what}: {}", std::io::Error::last_os_error()));
    // SAFETY: posix_openpt returns a new descriptor or -1; we own it from here on.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(fail("posix_openpt"));
    }
    // SAFETY: `master` is an open descriptor nobody else owns.
    let master = unsafe { File::from_raw_fd(master) };
    let fd = master.as_raw_fd();
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: plain calls on our master; ptsname_r writes a NUL-terminated name of at most
    // `name.len()` bytes.
    unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            return Err(fail("grantpt/unlockpt"));
        }
        if libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0 {
            return Err(fail("ptsname_r"));
        }
    }
    // SAFETY: NUL-terminated by ptsname_r.
    let port = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // Raw mode is a property of the terminal: set it through a short-lived serial-side descriptor.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&port)
        .map_err(|e| Error::Device(format!("{port}: {e}")))?;
    // SAFETY: `slave` is an open terminal descriptor; termios is plain data filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    Ok(PtyPair {
        master,
        port: PathBuf::from(port),
    })
}

/// Reads CR LF lines from a pseudo-terminal master with a timeout.
pub struct LineReader {
    file: File,
    buf: Vec<u8>,
}

impl LineReader {
    pub fn new(file: File) -> LineReader {
        LineReader {
            file,
            buf: Vec::with_capacity(256),
        }
    }

    /// The next complete line without its line end, or `None` when none came within `timeout`.
    /// While the serial side is closed the master reads EIO; that counts as nothing arriving.
    pub fn read_line(&mut self, timeout: std::time::Duration) -> Option<String> {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Some(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 50) as libc::c_int;
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready > 0 && pfd.revents & libc::POLLIN != 0 {
                let mut chunk = [0u8; 512];
                match self.file.read(&mut chunk) {
                    Ok(n) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                    _ => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            } else if ready != 0 {
                // POLLHUP: nobody has the serial side open.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// Sends a command line to the station.
    pub fn send(&mut self, command: &str) -> std::io::Result<()> {
        use std::io::Write;
        self.file.write_all(format!("{command}\r\n").as_bytes())
    }

    pub fn into_file(self) -> File {
        self.file
    }
}
