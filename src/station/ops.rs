//! systemd integration: `sd_notify(3)` datagrams to `$NOTIFY_SOCKET` (readiness, watchdog
//! keep-alives, status).
//!
//! The `sd-notify` crate gives the message texts and reads the watchdog environment; the send is
//! vigil's own. `sd_notify::notify` (0.5.0) sends on a blocking socket: measured against a socket
//! bound but not read (net.unix.max_dgram_qlen = 10), its 12th call had not returned after 5 s,
//! and a station must never wait for systemd. It also takes `@name` as a file path, where systemd
//! means an abstract socket.
use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;

/// A connection to systemd's notification socket, when the service runs under systemd.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `$WATCHDOG_USEC`, when systemd asked for keep-alives.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    /// Notifications as systemd asks through `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and
    /// `$WATCHDOG_PID` (keep-alives only when the watchdog is for this process).
    pub fn from_env() -> Notifier {
        let watchdog_usec =
            sd_notify::watchdog_enabled().and_then(|d| u64::try_from(d.as_micros()).ok());
        Notifier::new(
            std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from),
            watchdog_usec,
        )
    }

    /// Notifications to the datagram socket at `path` (an abstract socket when it starts with
    /// `@`; none when `None`), keep-alives every half of `watchdog_usec`. The socket does not
    /// block: a station must never wait for systemd to read (a full receive queue drops the
    /// message, with a warning).
    pub fn new(path: Option<PathBuf>, watchdog_usec: Option<u64>) -> Notifier {
        let socket = path.and_then(|path| match open(path.as_os_str()) {
            Ok(socket) => Some(socket),
            Err(e) => {
                log::warn!(
                    "NOTIFY_SOCKET {}: {e}; systemd notifications are off",
                    path.display()
                );
                None
            }
        });
        Notifier {
            socket,
            watchdog_every: watchdog_usec
                .filter(|&us| us > 0)
                .map(|us| Duration::from_micros(us / 2)),
        }
    }

    /// Sends one notification (`KEY=value` lines); never waits.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                log::warn!("sd_notify {state:?} to {addr:?}: {e}");
            }
        }
    }

    fn send(&self, state: NotifyState) {
        self.notify(&state.to_string());
    }

    pub fn ready(&self) {
        self.send(NotifyState::Ready);
    }

    pub fn watchdog(&self) {
        self.send(NotifyState::Watchdog);
    }

    pub fn stopping(&self) {
        self.send(NotifyState::Stopping);
    }

    pub fn status(&self, text: &str) {
        self.send(NotifyState::Status(text));
    }
}

/// An unbound non-blocking datagram socket and the address of `$NOTIFY_SOCKET`.
fn open(path: &OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_never_waits_for_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(Some(path), Some(200_000));
        assert_eq!(notifier.watchdog_every, Some(Duration::from_millis(100)));
        // Far more datagrams than a receive queue holds (net.unix.max_dgram_qlen, 10 by default)
        // while nobody reads: a blocking socket would hang here.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..1000 {
                notifier.watchdog();
            }
            done.send(()).unwrap();
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(10)).is_ok(),
            "notify blocked on a full queue"
        );
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn abstract_notify_socket_is_reached() {
        let name = format!("vigil-notify-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier::new(Some(PathBuf::from(format!("@{name}"))), None);
        assert_eq!(notifier.watchdog_every, None);
        notifier.ready();
        notifier.status("fps 12.0");
        notifier.stopping();
        let mut buf = [0u8; 64];
        let mut next = || {
            let n = receiver.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert_eq!(next(), "READY=1");
        assert_eq!(next(), "STATUS=fps 12.0");
        assert_eq!(next(), "STOPPING=1");
    }
}
