//! A team of threads for one sample's phases, waiting by spinning.
//!
//! Why not rayon's joins: on this 2-vCPU VM a rayon fork-join from outside
//! the pool cost 10-20 us back to back and 20-40 us after a short serial
//! gap (an idle worker parks, and waking it is a futex round trip), while a
//! batch-1 conv5 block at k = P/4 is about 0.7 ms split into three phases.
//! Here the calling thread and up to `threads - 1` helpers (spawned on the
//! rayon pool once per call) claim the items of each phase from a shared
//! counter and spin at the end of each phase until all of its items are
//! done. Nobody ever waits for a helper to start: the caller claims what is
//! left, so a helper that starts late (or never, when the pool is busy)
//! only costs parallelism, never a deadlock.
//!
//! A helper that has worked a call lingers for [`LINGER`] afterwards,
//! spinning on a mailbox for the next call (and running any other rayon
//! jobs that turn up meanwhile): a batch-1 CNN calls a block every few
//! hundred microseconds, and a parked worker took 20-500 us to wake on this
//! VM (a halted vCPU), so a freshly spawned helper often joined a block
//! only near its end.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One phase: its item count and what runs item `i`. Items of a phase run
/// in any order on any thread; a phase starts after every item of the one
/// before it has finished (and its writes are visible).
pub(crate) type Phase<'a> = (usize, &'a (dyn Fn(usize) + Sync));

/// `ctrl`'s bit that says the caller has finished: helpers arriving after
/// it is set leave at once. The bits below count helpers at work.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Spins before each yield while waiting for a phase to finish (a yield
/// gives the core away when the other thread was preempted).
const SPINS: u32 = 4096;

/// How long a helper waits for the next call after its last one.
const LINGER: Duration = Duration::from_millis(2);

/// A call's work offered to a lingering helper (an `Arc<Shared>` turned
/// into a raw pointer), or null.
static MAILBOX: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
/// Helpers lingering now.
static IDLE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread is a lingering helper (a helper started on it
    /// meanwhile, through `rayon::yield_now`, does not linger again).
    static LINGERING: Cell<bool> = const { Cell::new(false) };
}

struct Shared {
    ctrl: AtomicUsize,
    /// Per phase: next item to claim, items finished.
    claim: Vec<AtomicUsize>,
    done: Vec<AtomicUsize>,
    failed: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// The caller's phases, lifetime erased: only read by a helper between
    /// its entry into `ctrl` and its exit, while the caller waits in `run`.
    phases: *const [Phase<'static>],
}

// SAFETY: `phases` points at `Sync` closures that outlive every access (see
// the field doc); the rest is atomics and a mutex.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Enters the call unless its caller has finished, runs its phases and
    /// leaves; false if it was closed already.
    fn join(&self) -> bool {
        let mut s = self.ctrl.load(Ordering::Acquire);
        loop {
            if s & CLOSED != 0 {
                return false;
            }
            match self
                .ctrl
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        // SAFETY: entered before CLOSED, so the caller is still inside
        // `run` and the phases are alive until the decrement below.
        self.work(unsafe { &*self.phases });
        self.ctrl.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// Runs the phases from the start, claiming items; returns when the
    /// last phase has finished (or at once for a helper after a failure).
    fn work(&self, phases: &[Phase<'_>]) {
        for (p, &(n, f)) in phases.iter().enumerate() {
            loop {
                let i = self.claim[p].fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if !self.failed.load(Ordering::Relaxed)
                    && let Err(e) = catch_unwind(AssertUnwindSafe(|| f(i)))
                {
                    self.failed.store(true, Ordering::Relaxed);
                    let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(e);
                }
                self.done[p].fetch_add(1, Ordering::Release);
            }
            let mut spins = 0u32;
            while self.done[p].load(Ordering::Acquire) < n {
                std::hint::spin_loop();
                spins += 1;
                if spins == SPINS {
                    spins = 0;
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// A helper's life: join the call `job` if it is still open, then linger
/// for the next ones.
fn helper(mut job: Arc<Shared>) {
    loop {
        if !job.join() || LINGERING.with(Cell::get) {
            return;
        }
        drop(job);
        LINGERING.with(|l| l.set(true));
        IDLE.fetch_add(1, Ordering::AcqRel);
        let since = Instant::now();
        let next = loop {
            let p = MAILBOX.swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: only `run` puts `Arc::into_raw` pointers there,
                // and the swap hands each to one taker.
                break Some(unsafe { Arc::from_raw(p) });
            }
            if since.elapsed() > LINGER {
                break None;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            rayon::yield_now();
        };
        IDLE.fetch_sub(1, Ordering::AcqRel);
        LINGERING.with(|l| l.set(false));
        match next {
            Some(j) => job = j,
            None => return,
        }
    }
}

/// Runs `phases` in order on the calling thread and up to `threads - 1`
/// rayon helpers. A panic in an item is raised again here once every
/// thread has left the phases.
pub(crate) fn run(threads: usize, phases: &[Phase<'_>]) {
    let items: usize = phases.iter().map(|p| p.0).sum();
    if threads <= 1 || items <= 1 {
        for &(n, f) in phases {
            (0..n).for_each(f);
        }
        return;
    }
    // SAFETY: only the lifetime is erased; `run` does not return before
    // every helper that entered has left (the wait on `ctrl` below), and
    // helpers entering later see CLOSED and never read it.
    let erased: *const [Phase<'static>] =
        unsafe { std::mem::transmute::<*const [Phase<'_>], *const [Phase<'static>]>(phases) };
    let shared = Arc::new(Shared {
        ctrl: AtomicUsize::new(0),
        claim: phases.iter().map(|_| AtomicUsize::new(0)).collect(),
        done: phases.iter().map(|_| AtomicUsize::new(0)).collect(),
        failed: AtomicBool::new(false),
        panic: Mutex::new(None),
        phases: erased,
    });
    let mut helpers = threads.min(items) - 1;
    // One helper through the mailbox if one lingers, the others spawned.
    let posted = Arc::into_raw(Arc::clone(&shared)).cast_mut();
    let offered = IDLE.load(Ordering::Acquire) > 0
        && MAILBOX
            .compare_exchange(
                std::ptr::null_mut(),
                posted,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
    if offered {
        helpers -= 1;
    } else {
        // SAFETY: from `Arc::into_raw` above and not handed out.
        drop(unsafe { Arc::from_raw(posted) });
    }
    for _ in 0..helpers {
        let sh = Arc::clone(&shared);
        rayon::spawn(move || helper(sh));
    }
    shared.work(phases);
    shared.ctrl.fetch_or(CLOSED, Ordering::AcqRel);
    // Take the offer back if no helper took it.
    if offered
        && MAILBOX
            .compare_exchange(
                posted,
                std::ptr::null_mut(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    {
        // SAFETY: the pointer put in the mailbox above, taken back.
        drop(unsafe { Arc::from_raw(posted) });
    }
    while shared.ctrl.load(Ordering::Acquire) != CLOSED {
        std::hint::spin_loop();
    }
    let panic = shared
        .panic
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(p) = panic {
        resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item of every phase runs once, after all items of the phase
    /// before it; with one thread and with more.
    #[test]
    fn phases_run_in_order_each_item_once() {
        for threads in [1, 2, 4] {
            let a: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
            let b: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
            let first = |i: usize| {
                a[i].fetch_add(i + 1, Ordering::Relaxed);
            };
            // Each item of the second phase sums the whole first phase.
            let second = |i: usize| {
                let s: usize = a.iter().map(|v| v.load(Ordering::Relaxed)).sum();
                b[i].store(s, Ordering::Relaxed);
            };
            run(threads, &[(37, &first), (0, &|_| {}), (5, &second)]);
            for (i, v) in a.iter().enumerate() {
                assert_eq!(
                    v.load(Ordering::Relaxed),
                    i + 1,
                    "item {i}, {threads} threads"
                );
            }
            let want = 37 * 38 / 2;
            assert!(b.iter().all(|v| v.load(Ordering::Relaxed) == want));
        }
    }

    /// A panic in an item reaches the caller (on any thread it ran).
    #[test]
    fn a_panicking_item_panics_the_caller() {
        let r = catch_unwind(|| {
            run(2, &[(8, &|i| assert!(i != 5, "item five")), (2, &|_| {})]);
        });
        assert!(r.is_err());
    }
}
