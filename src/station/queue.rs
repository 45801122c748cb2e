//! The queue in front of every output: bounded, and it never blocks the stage that fills it.
//!
//! A full queue drops its own oldest entry and counts it in a loss marker kept outside the
//! capacity, so the marker itself is never evicted: the consumer receives it, in order, before
//! the entries that followed the gap (`LOST <n> <first>-<last>` on the serial line).
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An entry that may stand for a part (its id names the gap in a loss marker).
pub trait PartEntry {
    fn part_id(&self) -> Option<u64>;
}

/// Entries dropped in one run of overflow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    pub count: u64,
    /// First and last part id among the dropped entries, when any stood for a part.
    pub ids: Option<(u64, u64)>,
}

impl Loss {
    pub fn add(&mut self, id: Option<u64>) {
        self.count += 1;
        if let Some(id) = id {
            self.ids = Some(match self.ids {
                Some((first, last)) => (first.min(id), last.max(id)),
                None => (id, id),
            });
        }
    }
}

/// What the consumer gets next.
#[derive(Debug, PartialEq)]
pub enum Next<T> {
    Entry(T),
    /// Entries dropped before the ones that follow.
    Lost(Loss),
    /// Closed and drained.
    Closed,
}

struct Inner<T> {
    entries: VecDeque<T>,
    lost: Option<Loss>,
    closed: bool,
    dropped: u64,
}

pub struct DropQueue<T> {
    inner: Mutex<Inner<T>>,
    filled: Condvar,
    capacity: usize,
}

impl<T: PartEntry> DropQueue<T> {
    pub fn new(capacity: usize) -> DropQueue<T> {
        DropQueue {
            inner: Mutex::new(Inner {
                // Grows on demand: a large configured bound costs nothing until it is used.
                entries: VecDeque::with_capacity(capacity.clamp(1, 64)),
                lost: None,
                closed: false,
                dropped: 0,
            }),
            filled: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A consumer that panicked mid-operation leaves consistent data (each step is one
        // VecDeque call): keep going rather than take the producer down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry, dropping the oldest when full; never blocks. False when something was
    /// dropped (or the queue is closed and the entry discarded).
    pub fn push(&self, entry: T) -> bool {
        let mut inner = self.lock();
        if inner.closed {
            return false;
        }
        let mut kept_all = true;
        if inner.entries.len() == self.capacity {
            if let Some(old) = inner.entries.pop_front() {
                inner
                    .lost
                    .get_or_insert_with(Loss::default)
                    .add(old.part_id());
                inner.dropped += 1;
                kept_all = false;
            }
        }
        inner.entries.push_back(entry);
        drop(inner);
        self.filled.notify_one();
        kept_all
    }

    /// The next entry (a loss marker first), waiting up to `timeout`; None when nothing came.
    pub fn pop_timeout(&self, timeout: Duration) -> Option<Next<T>> {
        let until = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            if let Some(loss) = inner.lost.take() {
                return Some(Next::Lost(loss));
            }
            if let Some(entry) = inner.entries.pop_front() {
                return Some(Next::Entry(entry));
            }
            if inner.closed {
                return Some(Next::Closed);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inner = self
                .filled
                .wait_timeout(inner, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The next entry without waiting.
    pub fn try_pop(&self) -> Option<Next<T>> {
        self.pop_timeout(Duration::ZERO)
    }

    /// No entry is accepted from now on; the consumer drains what is left, then sees `Closed`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.filled.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Entries waiting (the loss marker not counted).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        let inner = self.lock();
        inner.entries.is_empty() && inner.lost.is_none()
    }

    /// Entries dropped since the start.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct E(Option<u64>);

    impl PartEntry for E {
        fn part_id(&self) -> Option<u64> {
            self.0
        }
    }

    #[test]
    fn overflow_drops_the_oldest_and_marks_the_gap_before_what_follows() {
        let q = DropQueue::new(3);
        for id in 0..3 {
            assert!(q.push(E(Some(id))));
        }
        assert!(!q.push(E(None)));
        assert!(!q.push(E(Some(3))));
        assert!(!q.push(E(Some(4))));
        // Entries 0, 1 and 2 went; the marker comes first, then what is left, in order.
        let lost = Loss {
            count: 3,
            ids: Some((0, 2)),
        };
        assert_eq!(q.try_pop(), Some(Next::Lost(lost)));
        assert_eq!(q.try_pop(), Some(Next::Entry(E(None))));
        assert_eq!(q.try_pop(), Some(Next::Entry(E(Some(3)))));
        assert_eq!(q.dropped(), 3);
        // A second overflow gets a marker of its own.
        for id in 5..8 {
            q.push(E(Some(id)));
        }
        assert_eq!(
            q.try_pop(),
            Some(Next::Lost(Loss {
                count: 1,
                ids: Some((4, 4))
            }))
        );
        q.close();
        assert!(!q.push(E(Some(9))));
        let rest: Vec<_> = std::iter::from_fn(|| q.try_pop()).take(4).collect();
        assert_eq!(
            rest,
            vec![
                Next::Entry(E(Some(5))),
                Next::Entry(E(Some(6))),
                Next::Entry(E(Some(7))),
                Next::Closed
            ]
        );
    }

    #[test]
    fn a_producer_never_waits_for_a_consumer_that_does_not_come() {
        let q = DropQueue::new(2);
        let start = Instant::now();
        for id in 0..100_000 {
            q.push(E(Some(id)));
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(q.len(), 2);
        assert_eq!(
            q.try_pop(),
            Some(Next::Lost(Loss {
                count: 99_998,
                ids: Some((0, 99_997))
            }))
        );
        assert_eq!(
            q.pop_timeout(Duration::from_millis(1)),
            Some(Next::Entry(E(Some(99_998))))
        );
    }

    #[test]
    fn a_waiting_consumer_wakes_for_an_entry() {
        let q = std::sync::Arc::new(DropQueue::new(4));
        let producer = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                q.push(E(Some(1)));
            })
        };
        assert_eq!(
            q.pop_timeout(Duration::from_secs(10)),
            Some(Next::Entry(E(Some(1))))
        );
        producer.join().unwrap();
        assert_eq!(q.pop_timeout(Duration::from_millis(10)), None);
    }
}
