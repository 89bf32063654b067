//! The daemon's lines on a rank's stdin: the ring's peer list once, and the job's teacher
//! replicas whenever they change. A thread reads them for the whole life of the rank.

use std::io::BufRead;
use std::sync::mpsc;

use anyhow::{anyhow, Result};
use ferry_cluster::distill::client::Directory;

use crate::protocol::{Control, Peers};

/// What the daemon has told this rank so far.
pub struct ControlChannel {
    peers: mpsc::Receiver<Peers>,
    /// The teacher replicas, kept current.
    pub teachers: Directory,
}

impl ControlChannel {
    /// Starts reading stdin.
    pub fn start() -> ControlChannel {
        let (tx, rx) = mpsc::channel();
        let teachers = Directory::default();
        let dir = teachers.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Control>(&line) {
                        Ok(Control::Peers(p)) => {
                            let _ = tx.send(p);
                        }
                        Ok(Control::Teachers(t)) => dir.set(t.teachers),
                        Err(e) => eprintln!("ignoring a corrupt control line from the daemon: {e}"),
                    }
                }
            })
            .expect("spawn the control thread");
        ControlChannel {
            peers: rx,
            teachers,
        }
    }

    /// Blocks until the daemon sends the ring's peer list.
    pub fn peers(&self, rank: usize) -> Result<Peers> {
        self.peers.recv().map_err(|_| {
            anyhow!("rank {rank}: the daemon closed the rendezvous before every rank reported")
        })
    }
}
