//! The daemon's lines on a rank's stdin: the ring's peer list once, the job's teacher
//! replicas whenever they change, a stop when a newer generation replaces this one, and
//! whether the rank may save its state. A thread reads them for the whole life of the rank.

use std::io::BufRead;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{anyhow, Result};
use ferry_cluster::distill::client::Directory;

use crate::protocol::{Control, Peers};

/// What runs when the daemon stops the rank (it breaks the ring's connections).
type Hook = Box<dyn Fn() + Send>;

/// The daemon's stop request, and what it triggers. A hook registered after the request
/// runs at once.
#[derive(Default)]
pub struct StopSignal {
    inner: Mutex<(Option<String>, Vec<Hook>)>,
    /// The training loop runs and looks at the signal at every step. Before that (set-up:
    /// loading, the rendezvous, forming the ring), there is no state to save, and a stop
    /// ends the process at once.
    polled: std::sync::atomic::AtomicBool,
}

impl StopSignal {
    /// Why the daemon stopped this rank, once it has.
    pub fn reason(&self) -> Option<String> {
        self.lock().0.clone()
    }

    /// Runs `hook` when the stop arrives (now, if it has).
    pub fn on_stop(&self, hook: Hook) {
        let mut g = self.lock();
        if g.0.is_some() {
            drop(g);
            hook();
        } else {
            g.1.push(hook);
        }
    }

    /// From now on the training loop answers a stop at its next step.
    pub fn set_polled(&self) {
        self.polled.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn trigger(&self, reason: String) {
        let hooks = {
            let mut g = self.lock();
            g.0.get_or_insert(reason.clone());
            std::mem::take(&mut g.1)
        };
        for h in hooks {
            h();
        }
        if !self.polled.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("stopped by the daemon during set-up: {reason}");
            std::process::exit(3);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<String>, Vec<Hook>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the daemon has told this rank so far.
pub struct ControlChannel {
    peers: mpsc::Receiver<Peers>,
    saves: mpsc::Receiver<bool>,
    /// The teacher replicas, kept current.
    pub teachers: Directory,
    /// The daemon's stop, if it has sent one.
    pub stop: Arc<StopSignal>,
}

impl ControlChannel {
    /// Starts reading stdin.
    pub fn start() -> ControlChannel {
        let (tx, rx) = mpsc::channel();
        let (save_tx, saves) = mpsc::channel();
        let teachers = Directory::default();
        let stop = Arc::new(StopSignal::default());
        let (dir, signal) = (teachers.clone(), stop.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Control>(&line) {
                        Ok(Control::Peers(p)) => {
                            if let Some(tx) = &tx {
                                let _ = tx.send(p);
                            }
                        }
                        Ok(Control::Teachers(t)) => dir.set(t.teachers),
                        Ok(Control::Stop(s)) => {
                            // A rank still waiting for its rendezvous stops waiting.
                            tx = None;
                            signal.trigger(s.stop);
                        }
                        Ok(Control::Save(a)) => {
                            let _ = save_tx.send(a.save);
                        }
                        Err(e) => eprintln!("ignoring a corrupt control line from the daemon: {e}"),
                    }
                }
            })
            .expect("spawn the control thread");
        ControlChannel {
            peers: rx,
            saves,
            teachers,
            stop,
        }
    }

    /// Waits up to `timeout` for the daemon's answer to a [`crate::protocol::WorkerMessage::MaySave`]
    /// (no answer: no).
    pub fn may_save(&self, timeout: std::time::Duration) -> bool {
        self.saves.recv_timeout(timeout).unwrap_or(false)
    }

    /// Blocks until the daemon sends the ring's peer list.
    pub fn peers(&self, rank: usize) -> Result<Peers> {
        self.peers.recv().map_err(|_| match self.stop.reason() {
            Some(why) => anyhow!("rank {rank}: stopped before the ring formed: {why}"),
            None => {
                anyhow!("rank {rank}: the daemon closed the rendezvous before every rank reported")
            }
        })
    }
}
