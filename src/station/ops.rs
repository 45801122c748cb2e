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
            UnixDatagram::unbound().ok().map(|s| (s, path))
        });
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0)
            .map(|us| Duration::from_micros(us / 2));
        Notifier {
            socket,
            watchdog_every,
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
