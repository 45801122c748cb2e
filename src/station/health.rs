//! Faults by origin, and READY once none is left.
//!
//! Reporting a fault never blocks: the events go into the outputs' own queues. The serial
//! writer reports the faults of its own port (`serial`) and writes their lines itself, so those
//! are not queued for the serial line (a lost port's FAULT line could not be delivered, and a
//! queue overflow must not evict it).
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use super::outputs::Outputs;
use super::status::Stats;
use super::Event;

pub struct Health {
    faults: Mutex<BTreeMap<&'static str, String>>,
    stats: Arc<Stats>,
    outputs: Arc<Outputs>,
}

impl Health {
    /// Starts with the given faults standing (e.g. the self-test not yet run).
    pub fn new(
        standing: &[(&'static str, &str)],
        stats: Arc<Stats>,
        outputs: Arc<Outputs>,
    ) -> Health {
        let faults: BTreeMap<_, _> = standing
            .iter()
            .map(|&(origin, reason)| (origin, reason.to_string()))
            .collect();
        stats.fault.store(!faults.is_empty(), Ordering::Relaxed);
        Health {
            faults: Mutex::new(faults),
            stats,
            outputs,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises (or updates) the fault of `origin`; repeated identical reports are sent once.
    /// The event is handed to the outputs under the lock (their queues never wait), so FAULT
    /// and READY reach every output in the order the state changed.
    pub fn fault(&self, origin: &'static str, reason: String) {
        let mut faults = self.lock();
        if faults.get(origin) != Some(&reason) {
            let event = Event::Fault(format!("{origin}: {reason}"));
            faults.insert(origin, reason);
            self.stats.fault.store(true, Ordering::Relaxed);
            self.outputs.event(&event, origin);
        }
    }

    /// Clears the fault of `origin`; READY goes out when it was the last one.
    pub fn clear(&self, origin: &'static str) {
        let mut faults = self.lock();
        if faults.remove(origin).is_some() && faults.is_empty() {
            self.stats.fault.store(false, Ordering::Relaxed);
            self.outputs.event(&Event::Ready, origin);
        }
    }

    pub fn is_faulted(&self, origin: &str) -> bool {
        self.lock().contains_key(origin)
    }

    pub fn outputs(&self) -> &Outputs {
        &self.outputs
    }
}
