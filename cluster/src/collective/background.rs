//! A collective on a thread of its own, so that its caller can go on computing while an
//! operation runs: the training runtime hands it each gradient bucket as soon as backward has
//! produced that bucket, and collects the sums after backward.
//!
//! Operations run one at a time in the order they were submitted (from any thread, through a
//! [`Submitter`]), so a runtime that submits in the same order on every rank drives every
//! rank's collective through the same sequence. Each submission returns a ticket; [`wait`]
//! returns that ticket's result, keeping any earlier results that arrive meanwhile for their
//! own waits. After an operation fails the collective is not used again: every later
//! operation fails at once with the first error, so a dead peer costs one timeout, not one per
//! queued bucket.
//!
//! [`wait`]: Background::wait

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Collective, CollectiveError, Wire};

enum Op {
    AllReduceSum(Wire),
    Broadcast(usize),
}

enum Request {
    Run { ticket: u64, op: Op, data: Vec<f32> },
    Stop,
}

type Reply = (u64, Result<Vec<f32>, CollectiveError>);

/// The message a panic carried (`panic!` with a literal or a formatted string), if any.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Submits operations to a [`Background`] collective from any thread.
#[derive(Clone)]
pub struct Submitter {
    tx: Sender<Request>,
    next: Arc<AtomicU64>,
}

impl Submitter {
    fn submit(&self, op: Op, data: Vec<f32>) -> u64 {
        let ticket = self.next.fetch_add(1, Ordering::SeqCst);
        // If the thread is gone, the ticket's wait reports it.
        let _ = self.tx.send(Request::Run { ticket, op, data });
        ticket
    }

    /// Queues an element-wise sum across ranks of `data`; the sum comes back from
    /// [`Background::wait`] with the returned ticket.
    pub fn all_reduce_sum(&self, data: Vec<f32>) -> u64 {
        self.submit(Op::AllReduceSum(Wire::F32), data)
    }

    /// As [`Submitter::all_reduce_sum`], with the values on `wire` between hosts.
    pub fn all_reduce_sum_as(&self, data: Vec<f32>, wire: Wire) -> u64 {
        self.submit(Op::AllReduceSum(wire), data)
    }

    /// Queues a broadcast of `root`'s `data` to every rank.
    pub fn broadcast(&self, data: Vec<f32>, root: usize) -> u64 {
        self.submit(Op::Broadcast(root), data)
    }
}

/// A collective running on its own thread. Its `all_reduce_sum` and `broadcast` block, for
/// the calls that need their result at once; they take and return owned buffers, so that
/// nothing is copied on the way to the thread.
pub struct Background {
    rank: usize,
    submitter: Submitter,
    replies: Receiver<Reply>,
    /// Results that arrived while waiting for a later ticket.
    early: HashMap<u64, Result<Vec<f32>, CollectiveError>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Moves `coll` to a new thread.
    pub fn spawn(mut coll: Box<dyn Collective>) -> std::io::Result<Background> {
        let rank = coll.rank();
        let (tx, requests) = mpsc::channel::<Request>();
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name(format!("ferry-comm-{rank}"))
            .spawn(move || {
                let mut failed: Option<CollectiveError> = None;
                while let Ok(Request::Run {
                    ticket,
                    op,
                    mut data,
                }) = requests.recv()
                {
                    let result = match &failed {
                        Some(e) => Err(e.clone()),
                        // A panic (a bug) fails the operation, not the thread silently.
                        None => catch_unwind(AssertUnwindSafe(|| match op {
                            Op::AllReduceSum(wire) => coll.all_reduce_sum_as(&mut data, wire),
                            Op::Broadcast(root) => coll.broadcast(&mut data, root),
                        }))
                        .unwrap_or_else(|panic| {
                            Err(CollectiveError::Failed {
                                rank,
                                reason: format!(
                                    "the collective panicked: {}",
                                    panic_message(panic.as_ref())
                                ),
                            })
                        }),
                    };
                    let reply = match result {
                        Ok(()) => Ok(data),
                        Err(e) => {
                            failed.get_or_insert_with(|| e.clone());
                            Err(e)
                        }
                    };
                    if reply_tx.send((ticket, reply)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Background {
            rank,
            submitter: Submitter {
                tx,
                next: Arc::new(AtomicU64::new(0)),
            },
            replies,
            early: HashMap::new(),
            thread: Some(thread),
        })
    }

    /// A handle that submits operations from other threads.
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// Waits for the operation with `ticket` and returns its buffer.
    pub fn wait(&mut self, ticket: u64) -> Result<Vec<f32>, CollectiveError> {
        if let Some(r) = self.early.remove(&ticket) {
            return r;
        }
        loop {
            let Ok((t, r)) = self.replies.recv() else {
                return Err(CollectiveError::Failed {
                    rank: self.rank,
                    reason: "the communication thread has stopped".into(),
                });
            };
            if t == ticket {
                return r;
            }
            self.early.insert(t, r);
        }
    }

    /// Sums `data` across ranks now, after everything queued before it.
    pub fn all_reduce_sum(&mut self, data: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        let ticket = self.submitter.all_reduce_sum(data);
        self.wait(ticket)
    }

    /// Copies `root`'s `data` to every rank now, after everything queued before it.
    pub fn broadcast(&mut self, data: Vec<f32>, root: usize) -> Result<Vec<f32>, CollectiveError> {
        let ticket = self.submitter.broadcast(data, root);
        self.wait(ticket)
    }
}

impl Drop for Background {
    /// Lets the queued operations finish (or fail), then stops the thread. Submitters that
    /// outlive this find the thread gone.
    fn drop(&mut self) {
        let _ = self.submitter.tx.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::tests::on_ring;
    use crate::collective::ring::RingConfig;
    use std::time::Duration;

    #[test]
    fn queued_operations_run_in_order_and_results_wait_for_their_ticket() {
        let out = on_ring(3, RingConfig::default(), |ring| {
            let rank = ring.rank();
            let mut bg = Background::spawn(Box::new(ring)).unwrap();
            let sub = bg.submitter();
            // Submitted from another thread, as backward's hooks do.
            let tickets = std::thread::spawn(move || {
                (0..4u64)
                    .map(|b| {
                        sub.all_reduce_sum(vec![(rank as f32 + 1.0) * (b as f32 + 1.0); 70_000])
                    })
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap();
            // Waited for out of order: the later results are kept for their own waits.
            let last = bg.wait(tickets[3]).unwrap();
            let mut sums: Vec<f32> = tickets[..3]
                .iter()
                .map(|&t| bg.wait(t).unwrap()[0])
                .collect();
            sums.push(last[69_999]);
            // A blocking operation after the queued ones.
            let v = bg.broadcast(vec![rank as f32; 5], 2).unwrap();
            (sums, v)
        });
        for (sums, v) in out {
            // 1 + 2 + 3 = 6, times the bucket's factor.
            assert_eq!(sums, vec![6.0, 12.0, 18.0, 24.0]);
            assert_eq!(v, vec![2.0; 5]);
        }
    }

    #[test]
    fn after_a_failure_every_queued_operation_fails_at_once_with_the_first_error() {
        let cfg = RingConfig {
            timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let out = on_ring(2, cfg, |ring| {
            if ring.rank() == 1 {
                drop(ring); // a rank that dies before the bucket all-reduces
                return None;
            }
            let mut bg = Background::spawn(Box::new(ring)).unwrap();
            let sub = bg.submitter();
            let tickets: Vec<u64> = (0..5)
                .map(|_| sub.all_reduce_sum(vec![1.0; 1 << 20]))
                .collect();
            let errors: Vec<String> = tickets
                .iter()
                .map(|&t| bg.wait(t).unwrap_err().to_string())
                .collect();
            Some(errors)
        });
        let errors = out[0].clone().unwrap();
        // The closed connection, not a timeout (one per queued bucket, were the ring retried).
        assert!(
            errors[0].contains("lost the connection to rank 1"),
            "{}",
            errors[0]
        );
        assert!(errors.iter().all(|e| e == &errors[0]), "{errors:?}");
    }
}
