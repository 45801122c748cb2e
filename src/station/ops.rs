//! systemd integration by hand: `sd_notify` datagrams to `$NOTIFY_SOCKET`.
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket, when the service runs under systemd.
pub struct Notifier {
    socket: Option<(UnixDatagram, std::path::PathBuf)>,
    /// Half of `$WATCHDOG_USEC`, when systemd asked for keep-alives.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = std::path::PathBuf::from(path);
            // Abstract sockets (`@name`) are not reachable through std's path-based API.
            if path.to_string_lossy().starts_with('@') {
                log::warn!("NOTIFY_SOCKET is an abstract socket; systemd notifications are off");
                return None;
            }
            Some(path)
        });
        let watchdog_usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        Notifier::new(socket, watchdog_usec)
    }

    /// Notifications to the datagram socket at `path` (none when `None`), keep-alives every half
    /// of `watchdog_usec`. The socket does not block: a station must never wait for systemd to
    /// read (a full receive queue drops the message, with a warning).
    pub fn new(path: Option<std::path::PathBuf>, watchdog_usec: Option<u64>) -> Notifier {
        let socket = path.and_then(|path| {
            let socket = UnixDatagram::unbound().ok()?;
            socket.set_nonblocking(true).ok()?;
            Some((socket, path))
        });
        Notifier {
            socket,
            watchdog_every: watchdog_usec
                .filter(|&us| us > 0)
                .map(|us| Duration::from_micros(us / 2)),
        }
    }

    pub fn notify(&self, state: &str) {
        if let Some((socket, path)) = &self.socket {
            if let Err(e) = socket.send_to(state.as_bytes(), path) {
                log::warn!("sd_notify {state:?} to {}: {e}", path.display());
            }
        }
    }

    pub fn ready(&self) {
        self.notify("READY=1");
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    pub fn status(&self, text: &str) {
        self.notify(&format!("STATUS={text}"));
    }
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
}
