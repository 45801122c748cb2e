//! Pseudo-terminal pairs: the demo and the tests put the serial signal on one, the way a PLC
//! would see it on a real port.
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The controlling side of a pseudo-terminal and the path of its serial side (`/dev/pts/N`).
pub struct PtyPair {
    pub master: File,
    pub port: PathBuf,
}

/// Opens a pair in raw mode (no echo, no line editing, no CR/LF translation).
pub fn open() -> Result<PtyPair> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty writes two descriptors and a NUL-terminated name of at most 128 bytes
    // (glibc uses a fixed buffer for the name; ours is as large as the longest /dev/pts path).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::Device(format!(
            "openpty: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `slave` is an open terminal descriptor; termios is plain data.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave, libc::TCSANOW, &t);
        }
        libc::close(slave);
    }
    // SAFETY: the name is NUL-terminated by openpty.
    let port = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok(PtyPair {
        // SAFETY: `master` is an open descriptor we own from here on.
        master: unsafe { File::from_raw_fd(master) },
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
