//! A team of threads for one inference call of one image. Its helpers spin between operations
//! instead of parking: waking a parked thread costs 20–70 µs on a virtualised core, as much as a
//! whole operation of one image, and one image's forward pass has a few dozen operations.
//!
//! Work is handed out in parts that any member may claim; the caller claims parts too and waits
//! only for parts that a running helper has claimed, so a helper that starts late (or never)
//! slows nothing down and cannot deadlock the caller.
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// A job: `f(part)` for every part.
type Job = *const (dyn Fn(usize) + Sync);

/// Spins before a waiting member starts yielding its core (in case the machine is
/// oversubscribed and the member it waits for needs that core).
const SPINS_BEFORE_YIELD: u32 = 1 << 14;

/// The state shared by the members of a team.
pub(super) struct Team {
    /// `generation << 32 | parts << 16 | next part to claim`: a claim is a compare-and-swap on
    /// the whole word, so it can only succeed for the job it read.
    state: AtomicU64,
    /// Parts of the current job finished (or failed).
    done: AtomicUsize,
    /// Whether a part of the current job panicked.
    panicked: AtomicBool,
    /// The current job; written only by the caller while no part of the previous job is running
    /// or claimable, read only by a member that holds a claim on the current job.
    job: UnsafeCell<Option<Job>>,
    stop: AtomicBool,
}

// SAFETY: `job` is the only non-`Sync` field; the claim protocol above makes every read of it
// happen after its write and before the next one.
unsafe impl Sync for Team {}

thread_local! {
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

const PART_BITS: u32 = 16;
const PART_MASK: u64 = (1 << PART_BITS) - 1;

fn unpack(state: u64) -> (u64, usize, usize) {
    (
        state >> 32,
        ((state >> PART_BITS) & PART_MASK) as usize,
        (state & PART_MASK) as usize,
    )
}

impl Team {
    /// Runs `body` on the calling thread with `helpers` more threads spinning beside it; every
    /// [`Team::parts`] inside `body` (on the calling thread) is shared with them.
    pub(super) fn run<R>(helpers: usize, body: impl FnOnce() -> R) -> R {
        let team = Team {
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            stop: AtomicBool::new(false),
        };
        // The helpers are rayon's threads: they keep their thread-local buffers warm from one
        // pass to the next, and a helper that no free thread picks up is simply not needed.
        rayon::in_place_scope(|scope| {
            for _ in 0..helpers {
                let team = &team;
                scope.spawn(move |_| team.help());
            }
            // Stops the helpers however `body` ends, or the scope would wait for them forever.
            struct Stop<'a>(&'a Team);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.stop.store(true, Ordering::Release);
                    CURRENT.with(|current| current.set(std::ptr::null()));
                }
            }
            let _stop = Stop(&team);
            CURRENT.with(|current| current.set(&team));
            body()
        })
    }

    /// Runs `f(part)` for `parts` parts on the calling thread's team, or returns `false` when
    /// the calling thread leads no team.
    pub(super) fn parts(parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        let team = CURRENT.with(|current| current.get());
        if team.is_null() {
            return false;
        }
        // SAFETY: `CURRENT` points at a team only while `Team::run` holds it alive on this thread.
        unsafe { &*team }.share(parts, f);
        true
    }

    fn share(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        assert!(parts <= PART_MASK as usize, "{parts} parts");
        let (generation, _, _) = unpack(self.state.load(Ordering::Acquire));
        // SAFETY: every part of the previous job is finished (the caller waited for them) and
        // none is claimable, so no member reads `job` now. The lifetime is erased because this
        // call does not return before every claimed part has finished.
        unsafe {
            *self.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f));
        }
        self.done.store(0, Ordering::Relaxed);
        self.state.store(
            (generation + 1) << 32 | (parts as u64) << PART_BITS,
            Ordering::Release,
        );
        while self.claim_and_run() {}
        let mut spins = 0;
        while self.done.load(Ordering::Acquire) < parts {
            backoff(&mut spins);
        }
        // SAFETY: as above; no part of this job runs any more.
        unsafe { *self.job.get() = None };
        if self.panicked.swap(false, Ordering::AcqRel) {
            panic!("a part of a parallel kernel panicked on a helper thread");
        }
    }

    /// Claims one part of the current job and runs it; `false` when none is left.
    fn claim_and_run(&self) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (_, parts, next) = unpack(state);
            if next >= parts {
                return false;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        let part = unpack(state).2;
        // SAFETY: the claim holds the caller in `share` until `done` counts this part, so the
        // job it published is alive and unchanged.
        let job = unsafe { (*self.job.get()).expect("a claimed part has a job") };
        if catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(part) })).is_err() {
            self.panicked.store(true, Ordering::Release);
        }
        self.done.fetch_add(1, Ordering::Release);
        true
    }

    fn help(&self) {
        let mut spins = 0;
        while !self.stop.load(Ordering::Acquire) {
            if self.claim_and_run() {
                spins = 0;
            } else {
                backoff(&mut spins);
            }
        }
    }
}

fn backoff(spins: &mut u32) {
    if *spins < SPINS_BEFORE_YIELD {
        *spins += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// A mutable slice that parts running at once index disjointly.
pub(super) struct Disjoint<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: only `Disjoint::range` gives access, and its contract makes the ranges of concurrent
// callers disjoint, so sharing it is sharing disjoint `&mut [T]`s.
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    pub(super) fn new(slice: &mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// # Safety
    /// No other live reference may overlap `range` (parts must use disjoint ranges), and the
    /// slice this came from must outlive the result.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn range(&self, range: std::ops::Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job_on_the_team() {
        let counts: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        Team::run(3, || {
            for job in 0..200 {
                let parts = 1 + job % counts.len();
                assert!(Team::parts(parts, &|part| {
                    // Long enough for the helpers to start and claim parts.
                    let start = std::time::Instant::now();
                    while start.elapsed() < std::time::Duration::from_micros(20) {}
                    counts[part].fetch_add(1, Ordering::Relaxed);
                    threads.lock().unwrap().insert(std::thread::current().id());
                }));
            }
        });
        let expected = |part: usize| (0..200).filter(|job| part < 1 + job % 37).count();
        for (part, count) in counts.iter().enumerate() {
            assert_eq!(count.load(Ordering::Relaxed), expected(part), "part {part}");
        }
        assert!(
            threads.lock().unwrap().len() > 1,
            "the helpers took no part"
        );
        // Outside `Team::run` the calling thread leads no team.
        assert!(!Team::parts(2, &|_| {}));
    }

    #[test]
    fn a_panicking_part_panics_the_caller_and_the_team_stops() {
        let result = std::panic::catch_unwind(|| {
            Team::run(1, || {
                Team::parts(8, &|part| assert!(part != 5, "part 5 fails"));
            })
        });
        assert!(result.is_err());
        assert!(!Team::parts(2, &|_| {}));
    }
}
