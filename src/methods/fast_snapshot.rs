//! A method's inference networks on the fast CPU kernels are a snapshot of its weights: built on
//! first use, shared by the calls that follow, dropped when training changes the weights.
use std::sync::{Arc, Mutex};

use crate::error::Result;

pub(crate) struct FastSnapshot<T>(Mutex<Option<Arc<T>>>);

impl<T> Default for FastSnapshot<T> {
    fn default() -> Self {
        FastSnapshot(Mutex::new(None))
    }
}

impl<T> FastSnapshot<T> {
    /// The snapshot, built with `build` if there is none.
    pub fn get_or_build(&self, build: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        // The slot only ever holds a finished snapshot or none, whatever a panic interrupted.
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(snapshot) = slot.as_ref() {
            return Ok(Arc::clone(snapshot));
        }
        let snapshot = Arc::new(build()?);
        *slot = Some(Arc::clone(&snapshot));
        Ok(snapshot)
    }

    /// The weights changed: the next use builds a new snapshot.
    pub fn drop_snapshot(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
