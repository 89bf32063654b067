//! The teacher's server: one reader thread per student connection decodes requests into a
//! shared queue; the calling thread takes everything queued (up to `max_batch` samples),
//! hands it to the model as one batch, and writes each student its answer. While the model
//! runs, new requests queue up, so under load every forward pass serves many students.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{read_request, write_frame, Inputs, Request, Response, SoftLabels};

/// What computes soft labels: the teacher model.
pub trait Teacher {
    /// Soft labels for each request, in order. A request the teacher cannot answer (an index
    /// out of range, a wrong image shape) gets its own error; the others are still served.
    fn soft_labels(&mut self, batch: &[&Inputs]) -> Vec<Result<SoftLabels, String>>;
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub requests: AtomicU64,
    pub samples: AtomicU64,
    /// Forward passes: `samples / batches` is the mean coalesced batch.
    pub batches: AtomicU64,
    pub connections: AtomicU64,
}

type Reply = Arc<Mutex<BufWriter<TcpStream>>>;

#[derive(Default)]
struct Queue {
    items: Mutex<VecDeque<(Request, Reply)>>,
    ready: Condvar,
}

/// Serves soft labels on `listener` until accepting fails; runs the model on this thread.
pub fn serve(
    listener: TcpListener,
    teacher: &mut dyn Teacher,
    max_batch: usize,
    stats: Arc<ServerStats>,
) -> std::io::Result<()> {
    let queue = Arc::new(Queue::default());
    {
        let queue = queue.clone();
        let stats = stats.clone();
        let listener = listener.try_clone()?;
        std::thread::Builder::new()
            .name("teacher-accept".into())
            .spawn(move || accept_loop(listener, queue, stats))?;
    }
    loop {
        let batch = take_batch(&queue, max_batch.max(1));
        let inputs: Vec<&Inputs> = batch.iter().map(|(r, _)| &r.inputs).collect();
        let samples: usize = inputs.iter().map(|i| i.len()).sum();
        let answers = teacher.soft_labels(&inputs);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.samples.fetch_add(samples as u64, Ordering::Relaxed);
        for ((req, reply), body) in batch.iter().zip(answers) {
            let frame = Response { id: req.id, body }.encode();
            // A student that went away only loses its own answer.
            let _ = write_frame(&mut *reply.lock().expect("reply lock"), &frame);
        }
    }
}

/// Blocks until something is queued, then takes requests in arrival order while they fit
/// in `max_batch` samples (always at least one).
fn take_batch(queue: &Queue, max_batch: usize) -> Vec<(Request, Reply)> {
    let mut items = queue.items.lock().expect("queue lock");
    while items.is_empty() {
        items = queue.ready.wait(items).expect("queue lock");
    }
    let mut batch = Vec::new();
    let mut samples = 0;
    while let Some((req, _)) = items.front() {
        let n = req.inputs.len();
        if !batch.is_empty() && samples + n > max_batch {
            break;
        }
        samples += n;
        batch.push(items.pop_front().expect("front exists"));
    }
    batch
}

fn accept_loop(listener: TcpListener, queue: Arc<Queue>, stats: Arc<ServerStats>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        let Ok(write_half) = conn.try_clone() else {
            continue;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let reply: Reply = Arc::new(Mutex::new(BufWriter::new(write_half)));
        let queue = queue.clone();
        let _ = std::thread::Builder::new()
            .name("teacher-conn".into())
            .spawn(move || {
                let mut r = BufReader::new(conn);
                // A closed or corrupt connection ends this student's session only.
                while let Ok(Some(req)) = read_request(&mut r) {
                    queue
                        .items
                        .lock()
                        .expect("queue lock")
                        .push_back((req, reply.clone()));
                    queue.ready.notify_one();
                }
            });
    }
}
