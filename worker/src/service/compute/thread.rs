//! The worker's compute thread: the one thread its steps run on, first of rayon's pool on a
//! CPU, with the pool's other threads kept awake while a step runs.

/// The one thread that runs this worker's forward passes. Steps run one at a time on a thread
/// that lives as long as the worker, so its allocations and caches stay warm; candle's kernels
/// spread each step over the CPU cores themselves. Everything that changes the KV pool (steps,
/// releases) runs here, in the order it arrived.
pub(in crate::service) struct ComputeThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl ComputeThread {
    /// `cpu`: the forward passes run on the CPU, in rayon's pool.
    pub(in crate::service) fn start(cpu: bool) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || {
                if cpu {
                    join_the_pool();
                }
                while let Ok(job) = rx.recv() {
                    // A panicking step fails that step (its caller sees the channel drop), not
                    // every later one.
                    let job = std::panic::AssertUnwindSafe(job);
                    let ran = if cpu { std::panic::catch_unwind(|| with_the_pool_awake(job)) } else { std::panic::catch_unwind(job) };
                    if ran.is_err() {
                        tracing::error!("a step panicked; the worker goes on");
                    }
                }
            })
            .expect("spawning the compute thread");
        ComputeThread { jobs }
    }

    /// Runs `f` on the compute thread; `Err` when the thread is gone (it panicked).
    pub(in crate::service) async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, &'static str> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| "the compute thread is gone")?;
        rx.await.map_err(|_| "the compute thread dropped a step")
    }
}

/// Makes this thread the first of rayon's global pool (once a process, with two threads or
/// more): the kernels' parallel loops then start here, the pool's other threads stealing their
/// parts, instead of each loop being handed to a pool thread while this one sleeps until it is
/// done — two thread wake-ups a matmul, some 200 a decode step of a 28-layer model, which cost a
/// step on a 2-core VM about a third of its time. With one thread the pool keeps a thread of its
/// own, as the work handed to it from other threads would find no thread of the pool to run it.
fn join_the_pool() {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads < 2 {
        return;
    }
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads).use_current_thread().build_global() {
        tracing::debug!("the compute thread runs beside rayon's pool: {e}");
    }
}

/// Runs `job` with the pool's other threads kept awake until it returns: each takes the
/// step's parallel work as it is handed out and, between two parallel loops, looks for more
/// instead of going to sleep. Left to rayon, a thread that finds no work for a few dozen
/// rounds sleeps, and each of a step's ~200 loops waited for it to be woken: serving Q4_K at
/// concurrency 8 on a 2-core VM (`perf`), the other thread ran 1,975 samples to the compute
/// thread's 3,355, which spent 188 of them waking it. Kept awake, concurrency 8 decoded faster
/// in 10 of 11 pairs of runs taking turns (Q4_K, Q8_0 and f32; by 4%–47%, f32 once 2% slower).
fn with_the_pool_awake(job: impl FnOnce()) {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Lets the other threads go once the job is over, returned or panicked.
    struct Over<'a>(&'a AtomicBool);
    impl Drop for Over<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let over = AtomicBool::new(false);
    let here = rayon::current_thread_index();
    rayon::in_place_scope(|s| {
        for _ in 1..rayon::current_num_threads() {
            s.spawn(|_| {
                // Taken by this thread after all (waiting on work of its own), it would wait
                // for itself: it leaves at once.
                if rayon::current_thread_index() == here {
                    return;
                }
                while !over.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        // Nothing to take: the core goes to any other thread that wants it
                        // (candle's own pool runs a prefill's element-wise operations).
                        std::thread::yield_now();
                    }
                }
            });
        }
        let _over = Over(&over);
        job();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::time::Duration;

    /// The pool's threads are let go when a job returns and when it panics, having done its
    /// parallel work: `with_the_pool_awake` returns only once every thread it kept is out (one
    /// left spinning would hold it, and the answer would not come).
    #[test]
    fn a_job_runs_with_the_pool_awake_and_lets_it_go() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        pool.spawn(move || {
            let mut sum = 0u64;
            with_the_pool_awake(|| sum = (0..1000u64).into_par_iter().sum());
            let panicked = std::panic::catch_unwind(|| with_the_pool_awake(|| panic!("a failing step"))).is_err();
            // A job after a panic runs as before.
            let mut again = 0u64;
            with_the_pool_awake(|| again = (0..10u64).into_par_iter().sum());
            tx.send((sum, panicked, again)).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), (499_500, true, 45));
    }
}
