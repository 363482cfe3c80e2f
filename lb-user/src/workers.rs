//! Session workers, the stage between accept and the session supervisor: one single-threaded
//! runtime per thread (`tune.threads`, one per CPU by default), each running the sessions it
//! was given from start to end. HAProxy's `nbthread` works the same way: a connection belongs
//! to one thread.
//!
//! Why not one work-stealing runtime: there, a kept-alive HTTP connection's requests were
//! analysed on whichever thread picked up the wake-up, so one connection's buffers and timers
//! moved between CPUs. In `cargo xtask bench http` (100 B responses, 5 runs) requests/s went from
//! 0.88× to 0.95× HAProxy's and p99 from 1.53× to 1.09× with workers. Each worker also accepts
//! its connections, from a listening socket of its own ([`crate::accept::bind`]), so that a
//! connection never crosses threads. Each worker's thread may be bound to a CPU
//! ([`crate::affinity`], `tune.cpu_affinity`).
use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
    thread::JoinHandle,
};
use tokio::{runtime, sync::oneshot};

use crate::affinity;

/// The running workers. Dropping it stops them, cancelling what sessions they still run;
/// [`Workers::stop`] does the same and waits for their threads.
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

struct Worker {
    handle: runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts a worker per entry of `cpus` (at least one), threads named `lb-worker-N`, each
    /// bound to its entry's CPU when it names one ([`crate::affinity`]).
    pub fn start(cpus: &[Option<usize>]) -> io::Result<Self> {
        let cpus = if cpus.is_empty() { &[None][..] } else { cpus };
        let workers = cpus
            .iter()
            .enumerate()
            .map(|(i, &cpu)| Worker::start(i, cpu))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The runtime of the worker whose turn it is (round robin: with kept-alive connections,
    /// an equal count per thread is what keeps the threads equally busy).
    pub fn next(&self) -> &runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        &self.workers[i].handle
    }

    /// The runtime of worker `i` (modulo their count).
    pub fn handle(&self, i: usize) -> &runtime::Handle {
        &self.workers[i % self.workers.len()].handle
    }

    /// Stops every worker, cancelling the sessions they still run, and waits for their threads.
    /// Blocks while the threads drop what they still run: call it once the sessions ended or
    /// were aborted.
    pub fn stop(mut self) {
        for w in &mut self.workers {
            w.signal_stop();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Worker {
    fn start(index: usize, cpu: Option<usize>) -> io::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        // The runtime is built in its thread: built here, it would be dropped here when the
        // thread cannot start, and tokio panics when a runtime is dropped inside another one's
        // `block_on` (where `daemon::run` starts the workers).
        let thread = std::thread::Builder::new()
            .name(format!("lb-worker-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = affinity::bind_current_thread(cpu) {
                        let why = format!("binding lb-worker-{index} to CPU {cpu}: {e}");
                        let _ = ready.send(Err(io::Error::new(e.kind(), why)));
                        return;
                    }
                }
                let rt = match runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(rt.handle().clone()));
                // Runs the spawned sessions until told to stop (or until `Workers` is gone);
                // dropping the runtime then cancels what is left.
                let _ = rt.block_on(stopped);
            })?;
        let handle = started
            .recv()
            .map_err(|_| io::Error::other("the thread ended before its runtime started"))??;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn signal_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.signal_stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::HashSet, sync::mpsc};

    #[test]
    fn sessions_are_spread_over_the_workers_in_turn_and_stay_on_their_thread() {
        let workers = Workers::start(&[None; 3]).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..6 {
            let tx = tx.clone();
            workers.next().spawn(async move {
                let before = std::thread::current().name().unwrap().to_owned();
                // A wake-up from elsewhere must resume the task on the same thread.
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let after = std::thread::current().name().unwrap().to_owned();
                tx.send((i, before, after)).unwrap();
            });
        }
        drop(tx);
        let mut seen: Vec<_> = rx.iter().collect();
        seen.sort();
        assert_eq!(seen.len(), 6);
        for (i, before, after) in &seen {
            assert_eq!(before, after);
            assert_eq!(before, &format!("lb-worker-{}", i % 3));
        }
        let threads: HashSet<_> = seen.iter().map(|s| s.1.clone()).collect();
        assert_eq!(threads.len(), 3);
        workers.stop();
    }

    #[test]
    fn stop_cancels_what_is_still_running_and_returns() {
        let workers = Workers::start(&[None; 2]).unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        workers.next().spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await;
        });
        workers.stop();
        // The task was dropped with its runtime, and the sender with it.
        assert!(rx.recv().is_err());
    }

    #[test]
    fn none_means_one() {
        let workers = Workers::start(&[]).unwrap();
        assert_eq!(workers.len(), 1);
        workers.stop();
    }
}
