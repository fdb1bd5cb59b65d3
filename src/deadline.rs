//! Time limits kept to the second, on the thread's own once-a-second tick.
//!
//! A request set two of the runtime's timers: the keep-alive wait before it and the wait for
//! Odoo's answer (a third, the connect's, for each new connection to Odoo, which is every
//! request to Odoo's HTTP workers). Each timer is a lock, a place in the timer wheel and the
//! clock read twice: about 900 instructions of about 21,400 a request (callgrind). The
//! limits they keep are seconds to hours (`keepalive_timeout`, a pool's `read` and `connect`
//! timeouts), which need no finer grain than a second. So a limit of [`COARSE_FROM`] or more
//! is kept here: the deadline goes into a slot of this thread's list, and the thread's
//! one-second tick ([`crate::conn`]'s `keep_a_timer`, which calls [`tick`]) wakes the tasks
//! whose deadlines have passed. Such a limit ends at most a second (and the tick's own delay)
//! after it is due, never before. Shorter limits, and threads without the tick, use the
//! runtime's timer as before.
//!
//! Each of the proxy's threads runs its own event loop (no work stealing), so a task stays on
//! the thread whose list holds its deadline. Should one be polled on another thread, it keeps
//! its deadline in that thread's list from then on (the first slot simply expires unused).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;

/// The shortest limit kept on the one-second tick: it may end up to a second late, 20 % of
/// this. Shorter ones use the runtime's timer.
pub const COARSE_FROM: Duration = Duration::from_secs(5);

/// The limit passed before the work was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// `work` within `limit`. Polled once first: work that finishes at once (a write to a socket
/// with room, a read of bytes already there) sets no deadline at all.
pub async fn within<F: Future>(limit: Duration, work: F) -> Result<F::Output, TimedOut> {
    let mut work = std::pin::pin!(work);
    if let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await
    {
        return Ok(done);
    }
    let mut limit = Limit::new(limit);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        limit.poll_passed(cx).map(|()| Err(TimedOut))
    })
    .await
}

/// One limit, from when it was made.
enum Limit {
    /// In a slot of a thread's list.
    Coarse(Slot),
    /// The runtime's timer, boxed: a future waiting on a limit holds only a pointer to it.
    Fine(Pin<Box<tokio::time::Sleep>>),
}

impl Limit {
    fn new(limit: Duration) -> Self {
        let at = Instant::now() + limit;
        if limit >= COARSE_FROM {
            if let Some(slot) = Slot::take(at) {
                return Limit::Coarse(slot);
            }
        }
        Limit::Fine(Box::pin(tokio::time::sleep_until(at)))
    }

    fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Limit::Fine(sleep) => sleep.as_mut().poll(cx),
            Limit::Coarse(slot) => {
                let at = slot.at;
                match slot.poll_passed(cx) {
                    Some(passed) => passed,
                    // On another thread than its list's: kept from now on in this thread's.
                    None => {
                        *self = Limit::new(at.saturating_duration_since(Instant::now()));
                        self.poll_passed(cx)
                    }
                }
            }
        }
    }
}

/// A deadline's place in a thread's list. Its slot is freed when the deadline passes (by the
/// tick) or when it is dropped first.
struct Slot {
    /// The thread whose list holds it ([`List::id`]).
    thread: u32,
    index: u32,
    /// The slot's use (each use of any slot of the list has its own number): another
    /// number there, or no slot there, means this deadline has passed.
    turn: u32,
    at: Instant,
}

impl Slot {
    /// A slot for `at` in this thread's list, if this thread ticks.
    fn take(at: Instant) -> Option<Slot> {
        LIST.with_borrow_mut(|list| {
            if list.tickers == 0 {
                return None;
            }
            let index = match list.free.pop() {
                Some(i) => i,
                None => {
                    list.slots.push(Entry {
                        at,
                        waker: None,
                        turn: 0,
                    });
                    u32::try_from(list.slots.len() - 1).ok()?
                }
            };
            let turn = list.next_turn;
            let entry = list.slots.get_mut(index as usize)?;
            entry.at = at;
            entry.waker = Some(Waker::noop().clone());
            entry.turn = turn;
            list.next_turn = turn.wrapping_add(1);
            list.live += 1;
            Some(Slot {
                thread: list.id,
                index,
                turn,
                at,
            })
        })
    }

    /// `Some(Ready)` once the deadline has passed; `Some(Pending)` with `cx`'s waker noted;
    /// `None` on a thread other than its list's.
    fn poll_passed(&self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        LIST.with_borrow_mut(|list| {
            if list.id != self.thread {
                return None;
            }
            let entry = match list.slots.get_mut(self.index as usize) {
                Some(e) if e.turn == self.turn && e.waker.is_some() => e,
                _ => return Some(Poll::Ready(())),
            };
            match &mut entry.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            Some(Poll::Pending)
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // A thread being torn down has no list left: nothing to free.
        let _ = LIST.try_with(|list| {
            let Ok(mut list) = list.try_borrow_mut() else {
                return;
            };
            if list.id != self.thread {
                return;
            }
            let index = self.index;
            if let Some(entry) = list.slots.get_mut(index as usize) {
                if entry.turn == self.turn {
                    list.free_slot(index);
                }
            }
        });
    }
}

/// A slot of a thread's list: free when it holds no waker.
struct Entry {
    at: Instant,
    waker: Option<Waker>,
    turn: u32,
}

/// A thread's deadlines.
struct List {
    /// Tells the threads' lists apart.
    id: u32,
    /// Ticks running on this thread ([`Ticking`]): with none, limits use the runtime's timer.
    tickers: u32,
    slots: Vec<Entry>,
    free: Vec<u32>,
    live: usize,
    /// The number of the next use of a slot.
    next_turn: u32,
}

impl List {
    fn free_slot(&mut self, index: u32) {
        if let Some(entry) = self.slots.get_mut(index as usize) {
            entry.waker = None;
            entry.turn = entry.turn.wrapping_add(1);
            self.free.push(index);
            self.live -= 1;
        }
    }

    /// With no deadline waiting, the slots of a busy time are given back (10,000 idle
    /// connections left 400 KiB behind), and the next ones start a short list. A wait that
    /// has passed may still hold its slot's number; no slot there, or one with another
    /// number, tells it so.
    fn shrink_if_empty(&mut self) {
        if self.live == 0 && self.slots.capacity() > KEPT_SLOTS {
            self.slots = Vec::new();
            self.free = Vec::new();
        }
    }
}

/// Slots a list keeps when none is in use.
const KEPT_SLOTS: usize = 64;

static NEXT_LIST: AtomicU32 = AtomicU32::new(0);

thread_local! {
    static LIST: RefCell<List> = RefCell::new(List {
        id: NEXT_LIST.fetch_add(1, Ordering::Relaxed),
        tickers: 0,
        slots: Vec::new(),
        free: Vec::new(),
        live: 0,
        next_turn: 0,
    });
}

/// A tick runs on this thread while this lives (made on the thread, held by the task that
/// calls [`tick`] once a second): limits set here meanwhile are kept on it. The task ends
/// with its event loop, and limits set after that use the runtime's timer again.
pub struct Ticking {
    list: u32,
}

/// Notes that a tick runs on this thread (see [`Ticking`]).
pub fn ticking() -> Ticking {
    LIST.with_borrow_mut(|list| {
        list.tickers += 1;
        Ticking { list: list.id }
    })
}

impl Drop for Ticking {
    fn drop(&mut self) {
        let _ = LIST.try_with(|list| {
            if let Ok(mut list) = list.try_borrow_mut() {
                if list.id == self.list {
                    list.tickers = list.tickers.saturating_sub(1);
                }
            }
        });
    }
}

/// The thread's tick: wakes the tasks whose deadlines passed by `now`.
pub fn tick(now: Instant) {
    let mut passed = Vec::new();
    LIST.with_borrow_mut(|list| {
        if list.live == 0 {
            list.shrink_if_empty();
            return;
        }
        for index in 0..list.slots.len() {
            let entry = &mut list.slots[index];
            if entry.waker.is_some() && entry.at <= now {
                passed.extend(entry.waker.take());
                // `index` came from the list's length, which fits in a u32 (see `take`).
                list.free_slot(index as u32);
            }
        }
        list.shrink_if_empty();
    });
    // Woken outside the list's borrow: a task may be polled right away.
    for waker in passed {
        waker.wake();
    }
}

/// Deadlines waiting on this thread's list.
pub fn waiting_here() -> usize {
    LIST.with_borrow(|list| list.live)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's tick, as `keep_a_timer` runs it.
    fn start_ticking() {
        let ticking = ticking();
        tokio::spawn(async move {
            let _ticking = ticking;
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                tick(Instant::now());
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_limit_ends_on_the_tick_after_it_is_due_never_before() {
        start_ticking();
        let started = Instant::now();
        let r = within(Duration::from_millis(7_300), std::future::pending::<()>()).await;
        assert_eq!(r, Err(TimedOut));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(7_300), "ended after {took:?}");
        assert!(took <= Duration::from_millis(8_300), "ended after {took:?}");
        assert_eq!(waiting_here(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn work_done_in_time_frees_its_slot_and_gives_its_result() {
        start_ticking();
        let work = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            7
        };
        let waiting = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            waiting_here()
        };
        let (r, during) = tokio::join!(within(Duration::from_secs(10), work), waiting);
        assert_eq!(r, Ok(7));
        assert_eq!(during, 1, "the limit waits in this thread's list");
        assert_eq!(waiting_here(), 0);
        // Work done at once sets no deadline at all.
        assert_eq!(within(Duration::from_secs(10), async { 8 }).await, Ok(8));
        assert_eq!(waiting_here(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_wait_frees_its_slot_for_the_next() {
        start_ticking();
        let dropped = tokio::time::timeout(
            Duration::from_secs(1),
            within(Duration::from_secs(60), std::future::pending::<()>()),
        )
        .await;
        assert!(dropped.is_err());
        assert_eq!(waiting_here(), 0);
        // The freed slot serves the next limit, which still ends in its own time.
        let started = Instant::now();
        let r = within(Duration::from_secs(6), std::future::pending::<()>()).await;
        assert_eq!(r, Err(TimedOut));
        assert!(started.elapsed() >= Duration::from_secs(6));
        assert_eq!(LIST.with_borrow(|l| l.slots.len()), 1);
    }

    /// Many waits at once, all passed: the list gives its slots back, and each wait still
    /// ends with its limit passed.
    #[tokio::test(start_paused = true)]
    async fn a_list_emptied_after_a_busy_time_is_given_back() {
        start_ticking();
        let mut waits: Vec<_> = (0..500)
            .map(|_| {
                Box::pin(within(
                    Duration::from_secs(10),
                    std::future::pending::<()>(),
                ))
            })
            .collect();
        for w in &mut waits {
            let polled = std::future::poll_fn(|cx| Poll::Ready(w.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
        }
        assert_eq!(waiting_here(), 500);
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(waiting_here(), 0);
        assert!(LIST.with_borrow(|l| l.slots.capacity()) <= KEPT_SLOTS);
        for w in &mut waits {
            assert_eq!(w.as_mut().await, Err(TimedOut));
        }
        drop(waits);
        // The next limits take slots afresh, and end in their own time.
        let started = Instant::now();
        let r = within(Duration::from_secs(5), std::future::pending::<()>()).await;
        assert_eq!(r, Err(TimedOut));
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn short_limits_and_threads_without_the_tick_use_the_runtimes_timer() {
        // No tick on this thread yet: even a long limit is the runtime's timer, to the instant.
        let started = Instant::now();
        let r = within(Duration::from_millis(6_250), std::future::pending::<()>()).await;
        assert_eq!(r, Err(TimedOut));
        assert_eq!(started.elapsed(), Duration::from_millis(6_250));
        start_ticking();
        let started = Instant::now();
        let r = within(Duration::from_millis(1_250), std::future::pending::<()>()).await;
        assert_eq!(r, Err(TimedOut));
        assert_eq!(started.elapsed(), Duration::from_millis(1_250));
        assert_eq!(LIST.with_borrow(|l| l.slots.len()), 0);
    }

    #[test]
    fn a_wait_moved_to_another_thread_keeps_its_deadline_there() {
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("runtime")
        };
        // Made and first polled on one thread, where it takes a slot...
        let first = rt();
        let mut wait = Box::pin(within(Duration::from_secs(5), std::future::pending::<()>()));
        first.block_on(async {
            start_ticking();
            let polled = std::future::poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
            assert_eq!(waiting_here(), 1);
        });
        // ...then awaited on another (whose clock is its own), which ends it in time all
        // the same.
        std::thread::scope(|s| {
            s.spawn(|| {
                rt().block_on(async {
                    let moved = Instant::now();
                    let r = wait.as_mut().await;
                    assert_eq!(r, Err(TimedOut));
                    assert!(moved.elapsed() >= Duration::from_secs(4));
                    assert_eq!(waiting_here(), 0);
                });
            });
        });
        drop(wait);
        assert_eq!(waiting_here(), 1, "the first slot waits for its tick");
        first.block_on(async { tokio::time::sleep(Duration::from_secs(6)).await });
        assert_eq!(waiting_here(), 0);
    }
}
