//! Knowledge distillation's data plane: how students get soft labels from a teacher.
//!
//! - this file: the wire format and the soft-label encoding (top-k `(u16 class, f16 value)`
//!   pairs, or every class as `f16`), and [`dense_targets`], the one place that turns
//!   encoded soft labels into the distribution the loss uses.
//! - [`server`]: the teacher's TCP server. It coalesces the requests of every student into
//!   one batch for its model.
//! - [`client`]: the student's side: replicas chosen by measured latency, a deadline per
//!   request, fail-over, the `on_teacher_failure` policy, and prefetching.
//! - [`cache`]: the students' soft-label cache, a mapped file shared by a node's ranks.
//!
//! # Why a binary protocol over TCP
//! A request in index mode is a few bytes per sample and a top-10 response is 40 bytes per
//! sample, so framing overhead matters as much as payload. A length-prefixed frame over a
//! persistent TCP connection costs 20 bytes of header per request, needs no code
//! generation, and decodes without copying into intermediate messages. gRPC (tonic) would
//! add HTTP/2 framing, protobuf varints over `repeated` fields and an async runtime inside
//! every rank process (ranks are synchronous libtorch programs). The protocol is versioned
//! so that a mismatched peer gets a clear error, not garbage.
//!
//! # Frames
//! Every frame is `u32 length` (of what follows, little-endian) and a body; all integers
//! are little-endian. A body starts with `u8 version` (1), `u8 kind`, `u16 0`, `u64 id`:
//! - kind 1, request by index: `u64 augmentation seed` (0: none), `u32 n`, `n × u32 index`.
//! - kind 2, request by tensor: `u32 n`, `u32 c, h, w`, `n·c·h·w × f32` (the input images).
//! - kind 3, soft labels: `u32 n`, `u32 classes`, `u32 k` (0: every class), `u32 f` (feature
//!   activations per sample, `distill.features`), `f ×` (`u32 dims`, `dims × u32` extent: one
//!   sample's shape), then `n` records: the soft label (see [`record_len`]), then each
//!   feature's values as `f16`, row-major.
//! - kind 4, error: `u32 length`, UTF-8 message.

pub mod cache;
pub mod client;
pub mod server;

use std::io::{self, Read, Write};

use half::f16;

/// The protocol version every frame carries (2: soft labels carry feature activations).
pub const VERSION: u8 = 2;
/// Most feature activations a record carries, most dimensions of one, and most values.
pub const MAX_FEATURES: usize = 16;
const MAX_FEATURE_DIMS: usize = 8;
const MAX_FEATURE_VALUES: usize = 1 << 24;
/// Frames larger than this are refused (a corrupt length must not allocate gigabytes).
pub const MAX_FRAME: usize = 512 << 20;

const KIND_INDEX: u8 = 1;
const KIND_TENSOR: u8 = 2;
const KIND_LABELS: u8 = 3;
const KIND_ERROR: u8 = 4;

/// What a student asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// Samples of the data set that teacher and student share, by index (train samples
    /// first, then the unlabelled pool), with the augmentation seed where one applies.
    Indices { aug_seed: u64, indices: Vec<u32> },
    /// The input images themselves (`n × shape`), for data the teacher cannot read.
    Tensor { shape: [u32; 3], data: Vec<f32> },
}

impl Inputs {
    /// Samples in the request.
    pub fn len(&self) -> usize {
        match self {
            Inputs::Indices { indices, .. } => indices.len(),
            Inputs::Tensor { shape, data } => checked_numel(shape)
                .and_then(|p| data.len().checked_div(p))
                .unwrap_or(0),
        }
    }

    /// Whether the request holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: u64,
    pub inputs: Inputs,
}

/// Encoded soft labels of `n` samples: `n` records of [`SoftLabels::record_len`] bytes
/// each, the soft label and then the sample's feature activations.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftLabels {
    pub classes: u32,
    /// Classes kept per sample; 0 means all of them.
    pub k: u32,
    /// One sample's shape of each feature activation in a record (none without
    /// `distill.features`).
    pub features: Vec<Vec<u32>>,
    pub records: Vec<u8>,
}

/// Values in one sample's activation of shape `shape` (a shape read from a frame is
/// checked with [`checked_numel`] first).
pub fn numel(shape: &[u32]) -> usize {
    shape.iter().map(|&d| d as usize).product()
}

/// Values in a tensor of `shape`, or None when the count overflows.
fn checked_numel(shape: &[u32]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
}

impl SoftLabels {
    /// Bytes of one sample's record: the soft label and the activations as f16.
    pub fn record_len(&self) -> usize {
        record_len(self.classes, self.k) + self.features.iter().map(|f| numel(f) * 2).sum::<usize>()
    }

    /// The soft-label part of record `i`.
    pub fn label(&self, i: usize) -> &[u8] {
        &self.record(i)[..record_len(self.classes, self.k)]
    }

    /// Feature `f` of every sample as f32, `n × numel`, row-major.
    pub fn feature(&self, f: usize) -> Vec<f32> {
        let start = record_len(self.classes, self.k)
            + self.features[..f]
                .iter()
                .map(|s| numel(s) * 2)
                .sum::<usize>();
        let len = numel(&self.features[f]) * 2;
        let mut out = Vec::with_capacity(self.len() * len / 2);
        for i in 0..self.len() {
            let rec = &self.record(i)[start..start + len];
            out.extend(
                rec.chunks_exact(2)
                    .map(|v| f16::from_bits(u16::from_le_bytes([v[0], v[1]])).to_f32()),
            );
        }
        out
    }

    /// Appends feature activations to every record: `values[f]` holds feature `f` of every
    /// sample (`n × numel(shapes[f])`, row-major), stored as f16.
    pub fn attach_features(&mut self, shapes: Vec<Vec<u32>>, values: &[Vec<f32>]) {
        debug_assert_eq!(shapes.len(), values.len());
        let n = self.len();
        let label = self.record_len();
        let mut records =
            Vec::with_capacity(n * (label + shapes.iter().map(|s| numel(s) * 2).sum::<usize>()));
        for i in 0..n {
            records.extend_from_slice(&self.records[i * label..(i + 1) * label]);
            for (shape, v) in shapes.iter().zip(values) {
                let per = numel(shape);
                for x in &v[i * per..(i + 1) * per] {
                    records.extend_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
                }
            }
        }
        self.features.extend(shapes);
        self.records = records;
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.records
            .len()
            .checked_div(self.record_len())
            .unwrap_or(0)
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `i`.
    pub fn record(&self, i: usize) -> &[u8] {
        let l = self.record_len();
        &self.records[i * l..(i + 1) * l]
    }
}

/// A response frame: soft labels in request order, or the teacher's error.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub id: u64,
    pub body: Result<SoftLabels, String>,
}

/// Bytes per sample: `k × (u16 class, f16 probability)` for top-k, `classes × f16` for all.
pub fn record_len(classes: u32, k: u32) -> usize {
    if k == 0 {
        classes as usize * 2
    } else {
        k as usize * 4
    }
}

/// Encodes top-k soft labels: for each sample, `k` (class, probability) pairs, in the
/// teacher's order (largest first). `classes` and `probs` are `n × k`, row-major.
pub fn encode_topk(total_classes: u32, k: u32, classes: &[i64], probs: &[f32]) -> SoftLabels {
    debug_assert_eq!(classes.len(), probs.len());
    let mut records = Vec::with_capacity(classes.len() * 4);
    for (c, p) in classes.iter().zip(probs) {
        records.extend_from_slice(&(*c as u16).to_le_bytes());
        records.extend_from_slice(&f16::from_f32(*p).to_bits().to_le_bytes());
    }
    SoftLabels {
        classes: total_classes,
        k,
        features: Vec::new(),
        records,
    }
}

/// Encodes every class's probability (`n × classes`, row-major) as f16.
pub fn encode_dense(classes: u32, probs: &[f32]) -> SoftLabels {
    let mut records = Vec::with_capacity(probs.len() * 2);
    for p in probs {
        records.extend_from_slice(&f16::from_f32(*p).to_bits().to_le_bytes());
    }
    SoftLabels {
        classes,
        k: 0,
        features: Vec::new(),
        records,
    }
}

/// The distillation target of each soft label (records' [`SoftLabels::label`] parts): a distribution over every class, `n × classes`
/// row-major. Top-k labels are **renormalised over their k classes** (the other classes get
/// probability 0); full labels are renormalised too, which only undoes f16 rounding. A
/// record whose values sum to zero (or whose class is out of range) is an error.
pub fn dense_targets<'a>(
    classes: u32,
    k: u32,
    records: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<f32>, String> {
    let c = classes as usize;
    let mut out = Vec::new();
    for rec in records {
        let start = out.len();
        out.resize(start + c, 0.0);
        let row = &mut out[start..];
        if k == 0 {
            for (j, v) in rec.chunks_exact(2).enumerate().take(c) {
                row[j] = f16::from_bits(u16::from_le_bytes([v[0], v[1]])).to_f32();
            }
        } else {
            for pair in rec.chunks_exact(4) {
                let class = u16::from_le_bytes([pair[0], pair[1]]) as usize;
                let p = f16::from_bits(u16::from_le_bytes([pair[2], pair[3]])).to_f32();
                if class >= c {
                    return Err(format!(
                        "soft label names class {class} of a {c}-class teacher"
                    ));
                }
                row[class] += p;
            }
        }
        let sum: f32 = row.iter().sum();
        if !(sum > 0.0 && sum.is_finite()) {
            return Err(format!(
                "a soft label sums to {sum}; the teacher's outputs are not probabilities"
            ));
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
    Ok(out)
}

fn header(buf: &mut Vec<u8>, kind: u8, id: u64) {
    buf.extend_from_slice(&0u32.to_le_bytes()); // length, patched in `finish`
    buf.extend_from_slice(&[VERSION, kind, 0, 0]);
    buf.extend_from_slice(&id.to_le_bytes());
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf
}

impl Request {
    /// The frame, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.inputs.len() * 4);
        match &self.inputs {
            Inputs::Indices { aug_seed, indices } => {
                header(&mut b, KIND_INDEX, self.id);
                b.extend_from_slice(&aug_seed.to_le_bytes());
                b.extend_from_slice(&(indices.len() as u32).to_le_bytes());
                b.extend_from_slice(bytemuck::cast_slice(indices.as_slice()));
            }
            Inputs::Tensor { shape, data } => {
                header(&mut b, KIND_TENSOR, self.id);
                b.extend_from_slice(&(self.inputs.len() as u32).to_le_bytes());
                for d in shape {
                    b.extend_from_slice(&d.to_le_bytes());
                }
                b.extend_from_slice(bytemuck::cast_slice(data.as_slice()));
            }
        }
        finish(b)
    }
}

impl Response {
    /// The frame, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match &self.body {
            Ok(l) => {
                header(&mut b, KIND_LABELS, self.id);
                b.extend_from_slice(&(l.len() as u32).to_le_bytes());
                b.extend_from_slice(&l.classes.to_le_bytes());
                b.extend_from_slice(&l.k.to_le_bytes());
                b.extend_from_slice(&(l.features.len() as u32).to_le_bytes());
                for shape in &l.features {
                    b.extend_from_slice(&(shape.len() as u32).to_le_bytes());
                    for d in shape {
                        b.extend_from_slice(&d.to_le_bytes());
                    }
                }
                b.extend_from_slice(&l.records);
            }
            Err(m) => {
                header(&mut b, KIND_ERROR, self.id);
                b.extend_from_slice(&(m.len() as u32).to_le_bytes());
                b.extend_from_slice(m.as_bytes());
            }
        }
        finish(b)
    }
}

/// A frame body being decoded; every read is bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(bad("truncated frame"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn done(&self) -> io::Result<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(bad("trailing bytes in frame"))
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one frame body; `Ok(None)` at a clean end of stream.
fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    // End of stream between frames is clean; inside a length it is a truncation.
    loop {
        match r.read(&mut len[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    r.read_exact(&mut len[1..])?;
    let len = u32::from_le_bytes(len) as usize;
    if !(12..=MAX_FRAME).contains(&len) {
        return Err(bad(&format!("frame of {len} bytes is out of range")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Splits the common header off a body: (kind, id, rest).
fn open(body: &[u8]) -> io::Result<(u8, u64, Cursor<'_>)> {
    let mut c = Cursor { b: body };
    let h = c.take(4)?;
    if h[0] != VERSION {
        return Err(bad(&format!(
            "peer speaks distillation protocol version {}, this ferry version {VERSION}; run the same ferry version everywhere",
            h[0]
        )));
    }
    let id = c.u64()?;
    Ok((h[1], id, c))
}

/// Reads one request; `Ok(None)` when the peer closed the connection.
pub fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let Some(body) = read_frame(r)? else {
        return Ok(None);
    };
    let (kind, id, mut c) = open(&body)?;
    let inputs = match kind {
        KIND_INDEX => {
            let aug_seed = c.u64()?;
            let n = c.u32()? as usize;
            let raw = c.take(n.checked_mul(4).ok_or_else(|| bad("bad count"))?)?;
            let indices = raw
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            Inputs::Indices { aug_seed, indices }
        }
        KIND_TENSOR => {
            let n = c.u32()? as usize;
            let shape = [c.u32()?, c.u32()?, c.u32()?];
            let per = checked_numel(&shape)
                .ok_or_else(|| bad("tensor request with an image shape too large"))?;
            if per == 0 {
                return Err(bad("tensor request with an empty image shape"));
            }
            let bytes = n
                .checked_mul(per)
                .and_then(|v| v.checked_mul(4))
                .ok_or_else(|| bad("bad count"))?;
            let data = c
                .take(bytes)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            Inputs::Tensor { shape, data }
        }
        k => return Err(bad(&format!("unexpected frame kind {k} for a request"))),
    };
    c.done()?;
    Ok(Some(Request { id, inputs }))
}

/// Reads one response; `Ok(None)` when the peer closed the connection.
pub fn read_response(r: &mut impl Read) -> io::Result<Option<Response>> {
    let Some(body) = read_frame(r)? else {
        return Ok(None);
    };
    let (kind, id, mut c) = open(&body)?;
    let body = match kind {
        KIND_LABELS => {
            let n = c.u32()? as usize;
            let classes = c.u32()?;
            let k = c.u32()?;
            if classes == 0 || classes > u32::from(u16::MAX) + 1 || k > classes {
                return Err(bad(&format!("soft labels with k {k} of {classes} classes")));
            }
            let count = c.u32()? as usize;
            if count > MAX_FEATURES {
                return Err(bad(&format!(
                    "soft labels with {count} feature activations"
                )));
            }
            let mut features = Vec::with_capacity(count);
            for _ in 0..count {
                let dims = c.u32()? as usize;
                if dims > MAX_FEATURE_DIMS {
                    return Err(bad(&format!("a feature activation of {dims} dimensions")));
                }
                let shape = (0..dims)
                    .map(|_| c.u32())
                    .collect::<io::Result<Vec<u32>>>()?;
                let values =
                    checked_numel(&shape).filter(|&v| (1..=MAX_FEATURE_VALUES).contains(&v));
                if values.is_none() {
                    return Err(bad(&format!("a feature activation of shape {shape:?}")));
                }
                features.push(shape);
            }
            let mut labels = SoftLabels {
                classes,
                k,
                features,
                records: Vec::new(),
            };
            labels.records = c
                .take(
                    n.checked_mul(labels.record_len())
                        .ok_or_else(|| bad("bad count"))?,
                )?
                .to_vec();
            Ok(labels)
        }
        KIND_ERROR => {
            let n = c.u32()? as usize;
            Err(String::from_utf8_lossy(c.take(n)?).into_owned())
        }
        k => return Err(bad(&format!("unexpected frame kind {k} for a response"))),
    };
    c.done()?;
    Ok(Some(Response { id, body }))
}

/// Writes a whole frame.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for inputs in [
            Inputs::Indices {
                aug_seed: 7,
                indices: vec![0, 5, u32::MAX],
            },
            Inputs::Indices {
                aug_seed: 0,
                indices: vec![],
            },
            Inputs::Tensor {
                shape: [1, 2, 2],
                data: vec![0.5, -1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5],
            },
        ] {
            let req = Request { id: 42, inputs };
            let frame = req.encode();
            let back = read_request(&mut frame.as_slice()).unwrap().unwrap();
            assert_eq!(back, req);
        }
        // 20 bytes of framing, then 4 bytes per sample: "bytes, not images".
        let req = Request {
            id: 1,
            inputs: Inputs::Indices {
                aug_seed: 0,
                indices: vec![1; 64],
            },
        };
        assert_eq!(req.encode().len(), 4 + 12 + 8 + 4 + 64 * 4);
    }

    #[test]
    fn topk_soft_labels_round_trip_and_renormalise() {
        // Two samples of a 5-class teacher, top-2.
        let classes = [3i64, 1, 0, 4];
        let probs = [0.6f32, 0.3, 0.5, 0.25];
        let labels = encode_topk(5, 2, &classes, &probs);
        assert_eq!(labels.len(), 2);
        assert_eq!(labels.record_len(), 8);
        let resp = Response {
            id: 9,
            body: Ok(labels.clone()),
        };
        let back = read_response(&mut resp.encode().as_slice())
            .unwrap()
            .unwrap();
        assert_eq!(back, resp);
        let dense = dense_targets(5, 2, (0..2).map(|i| labels.record(i))).unwrap();
        let want = [
            0.0,
            0.3 / 0.9,
            0.0,
            0.6 / 0.9,
            0.0,
            0.5 / 0.75,
            0.0,
            0.0,
            0.0,
            0.25 / 0.75,
        ];
        for (got, want) in dense.iter().zip(want) {
            // f16 keeps 11 significant bits.
            assert!((got - want).abs() < 1e-3, "{dense:?}");
        }
    }

    #[test]
    fn feature_activations_travel_with_the_soft_labels_as_f16() {
        let mut labels = encode_topk(5, 1, &[3, 1], &[0.9, 0.8]);
        // Two samples: a 2x1x2 activation and a 3-vector each.
        let conv: Vec<f32> = (0..8).map(|v| v as f32 * 0.25 - 1.0).collect();
        let vec: Vec<f32> = vec![1e-3, 2.0, -3.5, 100.0, 0.0, 7.25];
        labels.attach_features(vec![vec![2, 1, 2], vec![3]], &[conv.clone(), vec.clone()]);
        assert_eq!(labels.len(), 2);
        assert_eq!(labels.record_len(), 4 + 4 * 2 + 3 * 2);
        let resp = Response {
            id: 3,
            body: Ok(labels.clone()),
        };
        let frame = resp.encode();
        let back = read_response(&mut frame.as_slice()).unwrap().unwrap();
        assert_eq!(back, resp);
        let back = back.body.unwrap();
        assert_eq!(back.feature(0), conv, "exact in f16");
        for (got, want) in back.feature(1).iter().zip(&vec) {
            assert!((got - want).abs() <= want.abs() * 1e-3, "{got} {want}");
        }
        // The soft labels are where they were.
        let dense = dense_targets(5, 1, (0..2).map(|i| back.label(i))).unwrap();
        assert_eq!(dense[3], 1.0);
        assert_eq!(dense[5 + 1], 1.0);
        // A shape that claims more values than a frame may hold is refused.
        let mut huge = frame.clone();
        let at = 4 + 12 + 4 * 4 + 4; // the first shape's first extent
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_response(&mut huge.as_slice()).is_err());
        for cut in 1..frame.len() {
            assert!(read_response(&mut &frame[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn dense_soft_labels_round_trip_within_f16_precision() {
        let probs = [0.1f32, 0.2, 0.7, 0.001, 0.999, 0.0];
        let labels = encode_dense(3, &probs);
        assert_eq!(labels.len(), 2);
        let dense = dense_targets(3, 0, (0..2).map(|i| labels.record(i))).unwrap();
        for (got, want) in dense.iter().zip(probs) {
            assert!((got - want).abs() <= want * 1e-3 + 1e-6, "{dense:?}");
        }
    }

    #[test]
    fn corrupt_frames_are_errors_not_panics() {
        let frame = Request {
            id: 1,
            inputs: Inputs::Indices {
                aug_seed: 0,
                indices: vec![1, 2, 3],
            },
        }
        .encode();
        // Truncated anywhere.
        for cut in 1..frame.len() {
            assert!(read_request(&mut &frame[..cut]).is_err(), "cut at {cut}");
        }
        // A length that would allocate gigabytes.
        let mut huge = frame.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut huge.as_slice()).is_err());
        // Another version.
        let mut v1 = frame.clone();
        v1[4] = 1;
        let e = read_request(&mut v1.as_slice()).unwrap_err();
        assert!(e.to_string().contains("version 1"), "{e}");
        // A response read as a request.
        let resp = Response {
            id: 1,
            body: Err("no".into()),
        }
        .encode();
        assert!(read_request(&mut resp.as_slice()).is_err());
        // A clean end of stream.
        assert!(read_request(&mut &[][..]).unwrap().is_none());
        // Classes out of range in a record.
        let l = encode_topk(3, 1, &[7], &[1.0]);
        assert!(dense_targets(3, 1, [l.record(0)]).is_err());
    }
}
