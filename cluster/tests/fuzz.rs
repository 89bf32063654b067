//! Bounded fuzzing of what ferry reads from others: job specs (from any API client) and the
//! distillation wire frames (from any peer on the data plane). Each input is a mutation of a
//! valid one (bytes flipped, cut, repeated, spliced with hostile tokens) or plain noise; the
//! readers must answer every one with a value or an error, never a panic, and quickly.
//! `cargo fuzz` would need a nightly toolchain; this runs in CI, seeded and bounded, and a
//! failure prints the seed and the input that caused it. FERRY_FUZZ_SECONDS stretches it.

use std::time::{Duration, Instant};

use ferry_cluster::distill::{read_request, read_response, Inputs, Request, Response};
use ferry_cluster::fuzz::{mutate, Rng};
use ferry_cluster::spec::JobSpec;

fn budget() -> Duration {
    Duration::from_secs_f64(
        std::env::var("FERRY_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4.0),
    )
}

/// The seeds: the demo's own job specs (fine-tuning with `freeze` and `init`, and
/// distillation from a teacher service).
const SPECS: [&str; 2] = [
    include_str!("../../demo/jobs/target-feature-extraction.yaml"),
    include_str!("../../demo/jobs/student-distill.yaml"),
];

#[test]
fn job_specs_never_panic_and_never_hang() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for spec in SPECS {
        let parsed = JobSpec::parse(spec).expect("the seed specs are valid");
        seeds.push(spec.as_bytes().to_vec());
        seeds.push(serde_json::to_vec(&parsed).unwrap());
    }
    let seed = 0x5eed_0001u64;
    let mut rng = Rng(seed);
    let deadline = Instant::now() + budget();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let pick = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[pick]);
        let text = String::from_utf8_lossy(&input).into_owned();
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| JobSpec::parse(&text).map(|_| ()));
        assert!(
            r.is_ok(),
            "seed {seed:#x}, input {n}: the parser panicked on {text:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "seed {seed:#x}, input {n}: {:?} to parse {text:?}",
            started.elapsed()
        );
        n += 1;
    }
    eprintln!("{n} mutated specs parsed or refused");
    assert!(n > 100);
}

#[test]
fn distillation_frames_never_panic() {
    let requests = [
        Request {
            id: 7,
            inputs: Inputs::Indices {
                aug_seed: 3,
                indices: vec![1, 2, 3, 400],
            },
        }
        .encode(),
        Request {
            id: 8,
            inputs: Inputs::Tensor {
                shape: [1, 2, 2],
                data: vec![0.5; 8],
            },
        }
        .encode(),
    ];
    let labels = ferry_cluster::distill::encode_topk(10, 2, &[3, 1, 0, 9], &[0.7, 0.2, 0.6, 0.3]);
    let responses = [
        Response {
            id: 7,
            body: Ok(labels),
        }
        .encode(),
        Response {
            id: 9,
            body: Err("the teacher refused".into()),
        }
        .encode(),
    ];
    for f in &requests {
        assert!(read_request(&mut f.as_slice()).unwrap().is_some());
    }
    for f in &responses {
        assert!(read_response(&mut f.as_slice()).unwrap().is_some());
    }
    let seed = 0x5eed_0002u64;
    let mut rng = Rng(seed);
    let deadline = Instant::now() + budget();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let pick = rng.below(2);
        let (input, is_request) = match rng.below(3) {
            0 => (mutate(&mut rng, &requests[pick]), true),
            1 => (mutate(&mut rng, &responses[pick]), false),
            _ => {
                let noise: Vec<u8> = (0..rng.below(256)).map(|_| rng.next_u64() as u8).collect();
                (noise, rng.below(2) == 0)
            }
        };
        let r = std::panic::catch_unwind(|| {
            let mut r = input.as_slice();
            if is_request {
                while let Ok(Some(_)) = read_request(&mut r) {}
            } else {
                while let Ok(Some(_)) = read_response(&mut r) {}
            }
        });
        assert!(
            r.is_ok(),
            "seed {seed:#x}, input {n}: a reader panicked on {input:?}"
        );
        n += 1;
    }
    eprintln!("{n} mutated frames read or refused");
    assert!(n > 1000);
}
