//! Data sets, read a batch at a time: nothing but the index (paths, offsets, labels) is held
//! for the whole set.
//!
//! Three forms:
//! - a safetensors file (`images` N×C×H×W or N×H×W, uint8 or float; `labels` N, integers),
//!   read per sample at its offset (the page cache holds it, the rank does not);
//! - an ImageFolder directory: one sub-directory per class (sorted names give indices;
//!   images may sit deeper inside a class, as torchvision walks them), or for unlabelled
//!   data a flat directory of images;
//! - WebDataset shards: a `.tar` file, or a directory of them, holding `KEY.jpg` (or `.png`)
//!   and `KEY.cls` (the class index as text) per sample. Their index is built once and
//!   cached beside the job's other node-local files.
//!
//! Images are decoded per batch by the [`super::pipeline`]'s threads, cropped and resized
//! there ([`Transform`]), and kept as uint8 until the batch is on its device.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_cluster::spec::DataSpec;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::transform::{Draw, Transform, View};

/// The largest image file or tar member read (a bigger one is refused, not read).
const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// How a data set's index is built: where shard indexes are cached, and who hears how a long
/// build or scan is going (a line at most every few seconds: nothing for a quick one).
pub struct Indexing<'a> {
    /// A node-local directory for shard indexes (the job's scratch dir); None: not cached.
    pub cache: Option<&'a Path>,
    report: Option<&'a dyn Fn(String, u64, Option<u64>)>,
    every: Duration,
    last: Cell<Instant>,
}

impl<'a> Indexing<'a> {
    /// Reports go to `report(message, done, total)`, at most one per `every`, the first after
    /// `every` has passed.
    pub fn new(
        cache: Option<&'a Path>,
        report: Option<&'a dyn Fn(String, u64, Option<u64>)>,
        every: Duration,
    ) -> Indexing<'a> {
        Indexing {
            cache,
            report,
            every,
            last: Cell::new(Instant::now()),
        }
    }

    /// Cached in `cache`, not reported.
    pub fn cached(cache: Option<&'a Path>) -> Indexing<'a> {
        Indexing::new(cache, None, Duration::ZERO)
    }

    /// `done` of `total` (when known): reported if it is time; `what` is built only then.
    fn tick(&self, done: u64, total: Option<u64>, what: impl FnOnce() -> String) {
        let Some(report) = self.report else { return };
        if self.last.get().elapsed() < self.every {
            return;
        }
        self.last.set(Instant::now());
        report(what(), done, total);
    }
}

/// A labelled data set, read on demand.
pub struct Dataset {
    parts: Vec<Part>,
    labels: Vec<i64>,
    /// Class names of an ImageFolder (None otherwise).
    pub classes: Option<Vec<String>>,
    /// (C, H, W) of one image as the model sees it.
    shape: (i64, i64, i64),
    pub transform: Transform,
    channels: u32,
    skip_bad: bool,
    /// Samples read from their files so far (tests; per-rank counts).
    pub opened: AtomicU64,
}

/// A run of samples from one source (the training set is `data.train` then `data.unlabelled`).
struct Part {
    start: usize,
    len: usize,
    field: &'static str,
    source: Source,
}

enum Source {
    /// ImageFolder images.
    Files(Vec<PathBuf>),
    /// WebDataset members: (shard, offset, length) of each sample's image.
    Tar {
        shards: Vec<(PathBuf, File)>,
        members: Vec<(u32, u64, u64)>,
    },
    /// A safetensors file's `images`.
    Tensors {
        path: PathBuf,
        file: File,
        offset: u64,
        kind: Kind,
        chw: (i64, i64, i64),
    },
}

/// One batch, decoded: uint8 (or, from float data, float) N×C×H×W on the CPU.
pub struct Batch {
    pub images: Tensor,
    pub labels: Vec<i64>,
    pub draws: Vec<Draw>,
    /// Positions (in the requested indices) of the samples in the batch: all of them unless
    /// `data.skip_bad` left some out.
    pub kept: Vec<usize>,
    /// What was left out and why.
    pub skipped: Vec<String>,
}

impl Batch {
    /// The images as float in [0, 1] on `device`, flipped, jittered and normalised, and the
    /// labels there. CUDA gets the uint8 batch, through pinned memory, without blocking.
    pub fn to_device(&self, transform: &Transform, device: tch::Device) -> (Tensor, Tensor) {
        let x = if device.is_cuda() {
            self.images
                .pin_memory(device)
                .to_device_(device, self.images.kind(), true, false)
        } else {
            self.images.shallow_clone()
        };
        let x = match x.kind() {
            // The float work is in place: never on the batch's own tensor.
            Kind::Float if !device.is_cuda() && transform.changes(&self.draws) => x.copy(),
            Kind::Float => x,
            _ => unit_float(&x),
        };
        let y = Tensor::from_slice(&self.labels).to_device(device);
        (transform.finish(x, &self.draws), y)
    }
}

impl Dataset {
    /// Whether it holds no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// (C, H, W) of one image as the model sees it.
    pub fn shape(&self) -> (i64, i64, i64) {
        self.shape
    }

    /// The labels (-1: unlabelled).
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// The largest label plus one.
    pub fn label_count(&self) -> i64 {
        self.labels.iter().copied().max().map_or(0, |m| m + 1)
    }

    /// Samples with a label (>= 0).
    pub fn labelled(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }

    /// Loads the index of `path` (the `field` of the spec, for messages). `cache`: where a
    /// WebDataset index is kept between runs.
    pub fn load(
        path: &Path,
        field: &'static str,
        spec: &DataSpec,
        seed: u64,
        ix: &Indexing,
    ) -> Result<Dataset> {
        // A set loaded late (data.test, after training) is reported as a new one: nothing
        // for its first few seconds either.
        ix.last.set(Instant::now());
        let (part, labels, classes) = index(path, field, spec, true, ix, true)?;
        Self::from_parts(spec, seed, vec![(part, labels)], classes)
    }

    /// The training set of a job: `data.train`, followed by `data.unlabelled` (label -1)
    /// when there is one. Students and teachers index samples in this order.
    pub fn load_training(spec: &DataSpec, seed: u64, ix: &Indexing) -> Result<Dataset> {
        let (train, labels, classes) = index(
            Path::new(&spec.train.path),
            "data.train",
            spec,
            true,
            ix,
            true,
        )?;
        let mut parts = vec![(train, labels)];
        if let Some(u) = &spec.unlabelled {
            let (pool, labels, _) =
                index(Path::new(&u.path), "data.unlabelled", spec, false, ix, true)?;
            let n = labels.len();
            parts.push((pool, vec![-1; n]));
        }
        Self::from_parts(spec, seed, parts, classes)
    }

    fn from_parts(
        spec: &DataSpec,
        seed: u64,
        sources: Vec<(Indexed, Vec<i64>)>,
        classes: Option<Vec<String>>,
    ) -> Result<Dataset> {
        let channels = spec.channels.unwrap_or(3);
        let transform = Transform::new(spec, seed);
        let mut shape = None;
        let mut parts = Vec::new();
        let mut all = Vec::new();
        for (ix, labels) in sources {
            if labels.is_empty() {
                bail!("{}: {} holds no samples", ix.field, ix.path.display());
            }
            let s = match (&ix.source, spec.image_size) {
                (Source::Tensors { chw, .. }, _) => {
                    if transform.augment.random_resized_crop.is_some() {
                        bail!("{}: data.augment.random_resized_crop needs image files (ImageFolder or WebDataset shards), not a safetensors tensor; leave it out (flips and colour jitter work on tensors)", ix.field);
                    }
                    *chw
                }
                (_, Some(s)) => (i64::from(channels), i64::from(s), i64::from(s)),
                (_, None) => {
                    let (w, h) = ix.first_size;
                    (i64::from(channels), i64::from(h), i64::from(w))
                }
            };
            match shape {
                None => shape = Some(s),
                Some(t) if t != s => bail!(
                    "{} images are {s:?} but data.train images are {t:?} (C,H,W); set data.image_size",
                    ix.field
                ),
                _ => {}
            }
            if all.len() + labels.len() > u32::MAX as usize {
                bail!("data.train and data.unlabelled together exceed 2^32 samples");
            }
            parts.push(Part {
                start: all.len(),
                len: labels.len(),
                field: ix.field,
                source: ix.source,
            });
            all.extend(labels);
        }
        let shape = shape.unwrap_or((i64::from(channels), 0, 0));
        if let Some(n) = &spec.normalize {
            if n.mean.len() != shape.0 as usize {
                bail!(
                    "data.normalize: {} mean values for {}-channel images from {}",
                    n.mean.len(),
                    shape.0,
                    parts.first().map_or("data.train", |p| p.field)
                );
            }
        }
        Ok(Dataset {
            parts,
            labels: all,
            classes,
            shape,
            transform,
            channels,
            skip_bad: spec.skip_bad,
            opened: AtomicU64::new(0),
        })
    }

    /// This validation set, labelled as `train` labels its classes. ImageFolder classes are
    /// matched by name: a class the training set lacks is refused (the model was never
    /// trained on it), one the validation set lacks is simply absent. Without class names on
    /// the training side (safetensors, shards), the validation labels must stay within the
    /// ones the training labels reach.
    pub fn matched_to(mut self, train: &Dataset, field: &str) -> Result<Dataset> {
        match (&self.classes, &train.classes) {
            (Some(mine), Some(theirs)) => {
                let index: Vec<i64> = mine
                    .iter()
                    .map(|c| {
                        theirs.iter().position(|t| t == c).map(|i| i as i64).with_context(|| {
                            format!(
                                "{field}: class `{c}` is not one of data.train's classes ({}): the model is not trained on it; remove it from {field} or add it to data.train",
                                theirs.join(", ")
                            )
                        })
                    })
                    .collect::<Result<_>>()?;
                for l in &mut self.labels {
                    *l = index[*l as usize];
                }
            }
            _ => {
                let (trained, labels) = (train.label_count(), self.label_count());
                if labels > trained {
                    bail!(
                        "{field}: labels go up to {} but data.train's only to {}: the model is not trained on the classes above",
                        labels - 1,
                        trained - 1
                    );
                }
            }
        }
        if self.shape != train.shape {
            bail!(
                "{field} images are {:?} but data.train images are {:?} (C,H,W); set data.image_size",
                self.shape,
                train.shape
            );
        }
        Ok(self)
    }

    /// Decodes the samples `indices` in `view` into one batch. With `data.skip_bad`, an
    /// unreadable image is left out (and said in `skipped`); without, it fails the batch
    /// with its path.
    pub fn batch(&self, indices: &[u32], view: View) -> Result<Batch> {
        if let Some(b) = self.tensor_batch(indices, view)? {
            return Ok(b);
        }
        let mut out = Batch {
            images: Tensor::new(),
            labels: Vec::with_capacity(indices.len()),
            draws: Vec::with_capacity(indices.len()),
            kept: Vec::with_capacity(indices.len()),
            skipped: Vec::new(),
        };
        let mut images = Vec::with_capacity(indices.len());
        for (pos, &i) in indices.iter().enumerate() {
            match self.sample(i, view) {
                Ok((t, d)) => {
                    images.push(t);
                    out.draws.push(d);
                    out.labels.push(self.labels[i as usize]);
                    out.kept.push(pos);
                }
                Err(e) if self.skip_bad && !is_fatal(&e) => out.skipped.push(format!("{e:#}")),
                Err(e) => return Err(e),
            }
        }
        if images.is_empty() {
            bail!(
                "every sample of a batch is unreadable (data.skip_bad): {}",
                out.skipped.join("; ")
            );
        }
        out.images = join_pixels(&images, true);
        Ok(out)
    }

    /// A batch wholly from one safetensors file: each sample read straight into its place
    /// in one buffer (no tensor per sample). None if the samples come from elsewhere.
    fn tensor_batch(&self, indices: &[u32], view: View) -> Result<Option<Batch>> {
        let Some(&first) = indices.first() else {
            return Ok(None);
        };
        let at = self
            .parts
            .partition_point(|p| p.start + p.len <= first as usize);
        let part = &self.parts[at];
        let Source::Tensors {
            path,
            file,
            offset,
            kind,
            chw,
        } = &part.source
        else {
            return Ok(None);
        };
        let range = part.start..part.start + part.len;
        if !indices.iter().all(|&i| range.contains(&(i as usize))) {
            return Ok(None);
        }
        let bytes = (chw.0 * chw.1 * chw.2) as usize * kind.elt_size_in_bytes();
        let mut buf = vec![0u8; bytes * indices.len()];
        for (slot, &i) in buf.chunks_exact_mut(bytes).zip(indices) {
            let local = (i as usize - part.start) as u64;
            file.read_exact_at(slot, offset + local * bytes as u64)
                .with_context(|| format!("{}: cannot read {}", part.field, path.display()))?;
        }
        self.opened
            .fetch_add(indices.len() as u64, Ordering::Relaxed);
        let n = indices.len() as i64;
        let images = Tensor::from_data_size(&buf, &[n, chw.0, chw.1, chw.2], *kind);
        let images = match kind {
            Kind::Uint8 | Kind::Float => images,
            _ => images.to_kind(Kind::Float),
        };
        let size = (chw.2 as u32, chw.1 as u32);
        Ok(Some(Batch {
            images,
            labels: indices.iter().map(|&i| self.labels[i as usize]).collect(),
            draws: indices
                .iter()
                .map(|&i| self.transform.draw(view, i, size).0)
                .collect(),
            kept: (0..indices.len()).collect(),
            skipped: Vec::new(),
        }))
    }

    /// Sample `i` in `view`: C×H×W (uint8, or float from float data) and its draw.
    fn sample(&self, i: u32, view: View) -> Result<(Tensor, Draw)> {
        let at = self
            .parts
            .partition_point(|p| p.start + p.len <= i as usize);
        let part = &self.parts[at];
        let local = i as usize - part.start;
        self.opened.fetch_add(1, Ordering::Relaxed);
        let (c, h, w) = self.shape;
        match &part.source {
            Source::Tensors {
                path,
                file,
                offset,
                kind,
                chw,
            } => {
                let bytes = (chw.0 * chw.1 * chw.2) as usize * kind.elt_size_in_bytes();
                let mut buf = vec![0u8; bytes];
                file.read_exact_at(&mut buf, offset + (local * bytes) as u64)
                    .map_err(|e| fatal(e.into()))
                    .with_context(|| format!("{}: cannot read {}", part.field, path.display()))?;
                let t = Tensor::from_data_size(&buf, &[chw.0, chw.1, chw.2], *kind);
                let (d, _) = self.transform.draw(view, i, (chw.2 as u32, chw.1 as u32));
                Ok((t, d))
            }
            Source::Files(paths) => {
                let p = &paths[local];
                let read = || -> Result<Vec<u8>> {
                    let len = std::fs::metadata(p)?.len();
                    if len > MAX_IMAGE_BYTES {
                        bail!("{len} bytes, more than an image may have ({MAX_IMAGE_BYTES})");
                    }
                    Ok(std::fs::read(p)?)
                };
                let bytes = read().with_context(|| {
                    format!("{}: cannot read image {}", part.field, p.display())
                })?;
                self.decode(&bytes, i, view, (c, h, w))
                    .with_context(|| format!("{}: image {}", part.field, p.display()))
            }
            Source::Tar { shards, members } => {
                let (shard, offset, len) = members[local];
                let (path, file) = &shards[shard as usize];
                let mut bytes = vec![0u8; len as usize];
                file.read_exact_at(&mut bytes, offset).with_context(|| {
                    format!(
                        "{}: cannot read sample {local} of {}",
                        part.field,
                        path.display()
                    )
                })?;
                self.decode(&bytes, i, view, (c, h, w)).with_context(|| {
                    format!(
                        "{}: the image at byte {offset} of {}",
                        part.field,
                        path.display()
                    )
                })
            }
        }
    }

    /// Decodes an image file's bytes, then crops and resizes it to `(c, h, w)`.
    fn decode(
        &self,
        bytes: &[u8],
        i: u32,
        view: View,
        (c, h, w): (i64, i64, i64),
    ) -> Result<(Tensor, Draw)> {
        let img = ferry_decode::decode(bytes, self.channels).context("cannot decode it")?;
        let size = (img.width, img.height);
        let (d, out) = self.transform.draw(view, i, size);
        if out != (w as u32, h as u32) {
            bail!(
                "it is {}x{}, others {w}x{h}; set data.image_size to resize",
                size.0,
                size.1
            );
        }
        let img = if d.crop.is_none() && out == size {
            img
        } else {
            ferry_decode::resize(img, d.crop, out.0, out.1)?
        };
        let t = Tensor::from_slice(&img.data)
            .view([h, w, c])
            .permute([2, 0, 1]);
        Ok((t, d))
    }
}

/// Pixels as float: uint8 scaled to [0, 1], other kinds converted.
fn unit_float(t: &Tensor) -> Tensor {
    let mut f = t.to_kind(Kind::Float);
    if t.kind() == Kind::Uint8 {
        let _ = f.g_div_scalar_(255.0);
    }
    f
}

/// Samples (`stack`) or batches (else, `cat`) joined along dimension 0: uint8 while every
/// part is, float in [0, 1] otherwise.
pub(crate) fn join_pixels(parts: &[Tensor], stack: bool) -> Tensor {
    let floats: Vec<Tensor>;
    let parts = if parts.iter().all(|t| t.kind() == Kind::Uint8) {
        parts
    } else {
        floats = parts.iter().map(unit_float).collect();
        &floats
    };
    if stack {
        Tensor::stack(parts, 0)
    } else {
        Tensor::cat(parts, 0)
    }
}

/// An error no `skip_bad` hides: the data set itself, not one image, is unreadable.
#[derive(Debug)]
struct Fatal;

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the data file cannot be read")
    }
}

impl std::error::Error for Fatal {}

fn fatal(e: anyhow::Error) -> anyhow::Error {
    e.context(Fatal)
}

fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Fatal>())
}

/// A source's index.
struct Indexed {
    path: PathBuf,
    field: &'static str,
    source: Source,
    /// The first image's (width, height) (images only).
    first_size: (u32, u32),
}

/// Lists `path`: its samples, their labels and (ImageFolder) the class names.
fn index(
    path: &Path,
    field: &'static str,
    spec: &DataSpec,
    labelled: bool,
    ix: &Indexing,
    scan: bool,
) -> Result<(Indexed, Vec<i64>, Option<Vec<String>>)> {
    let shards = shards(path, field)?;
    let (source, labels, classes, first) = if !shards.is_empty() {
        let (source, labels, first) = index_shards(shards, field, labelled, ix)?;
        (source, labels, None, first)
    } else if path.is_dir() {
        let (files, labels, classes) = folder_files(path, field, labelled, ix)?;
        let first = match files.first() {
            Some(f) if spec.image_size.is_none() => image::image_dimensions(f)
                .with_context(|| format!("{field}: cannot decode image {}", f.display()))?,
            _ => (0, 0),
        };
        (Source::Files(files), labels, classes, first)
    } else {
        let (source, labels) = index_safetensors(path, field, labelled, scan, ix)?;
        (source, labels, None, (0, 0))
    };
    if labelled && labels.iter().any(|&l| l < 0) {
        bail!("{field}: labels must be class indices >= 0");
    }
    Ok((
        Indexed {
            path: path.to_path_buf(),
            field,
            source,
            first_size: first,
        },
        labels,
        classes,
    ))
}

/// The WebDataset shards `path` names: itself if it is a `.tar` file, or the `.tar` files of
/// a directory that has no sub-directories. Empty: not shards.
fn shards(path: &Path, field: &str) -> Result<Vec<PathBuf>> {
    let is_tar = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("tar"));
    if path.is_file() {
        return Ok(if is_tar(path) {
            vec![path.to_path_buf()]
        } else {
            Vec::new()
        });
    }
    if !path.is_dir() {
        return Ok(Vec::new());
    }
    let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(path)
        .with_context(|| format!("{field}: cannot read directory {}", path.display()))?
        .filter_map(|e| e.ok())
        .collect();
    if entries
        .iter()
        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    {
        return Ok(Vec::new());
    }
    let mut tars = Vec::new();
    for e in &entries {
        if is_tar(&e.path()) {
            super::confine::no_link(e).with_context(|| field.to_string())?;
            tars.push(e.path());
        }
    }
    tars.sort();
    Ok(tars)
}

/// What the index of one shard holds, as cached.
#[derive(Serialize, Deserialize)]
struct ShardIndex {
    /// (offset, length, label) of each sample's image, in the shard's order.
    samples: Vec<(u64, u64, i64)>,
    first_size: (u32, u32),
}

fn index_shards(
    shards: Vec<PathBuf>,
    field: &str,
    labelled: bool,
    ix: &Indexing,
) -> Result<(Source, Vec<i64>, (u32, u32))> {
    let (mut members, mut labels, mut first) = (Vec::new(), Vec::new(), None);
    let mut open = Vec::new();
    let total = shards.len() as u64;
    for (k, shard) in shards.into_iter().enumerate() {
        ix.tick(k as u64, Some(total), || {
            format!(
                "indexing {field}: {k} of {total} shards read, {} samples so far",
                members.len()
            )
        });
        let file = File::open(&shard)
            .with_context(|| format!("{field}: cannot open {}", shard.display()))?;
        let listed = cached_shard_index(&shard, &file, field, labelled, ix.cache)?;
        for &(offset, len, label) in &listed.samples {
            members.push((k as u32, offset, len));
            labels.push(label);
        }
        if !listed.samples.is_empty() {
            first.get_or_insert(listed.first_size);
        }
        open.push((shard, file));
    }
    Ok((
        Source::Tar {
            shards: open,
            members,
        },
        labels,
        first.unwrap_or((0, 0)),
    ))
}

/// A shard's index from the cache when the shard has not changed (same size and mtime),
/// else built and cached.
fn cached_shard_index(
    shard: &Path,
    file: &File,
    field: &str,
    labelled: bool,
    cache: Option<&Path>,
) -> Result<ShardIndex> {
    use sha2::Digest;
    let meta = file.metadata()?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = format!(
        "{}\0{}\0{mtime}\0{labelled}",
        std::fs::canonicalize(shard)
            .unwrap_or_else(|_| shard.to_path_buf())
            .display(),
        meta.len()
    );
    let hash = sha2::Sha256::digest(key.as_bytes());
    let name = format!(
        ".shard-index-{}.json",
        hash.iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let cached = cache.map(|d| d.join(name));
    if let Some(p) = &cached {
        if let Some(ix) = std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<ShardIndex>(&b).ok())
        {
            return Ok(ix);
        }
    }
    let ix = build_shard_index(shard, file, field, labelled)?;
    if let Some(p) = &cached {
        // A cache that cannot be written costs the next run a rebuild, nothing more.
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec(&ix)?).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(ix)
}

/// Reads a shard's member headers (not its images): each sample's image member and its
/// `.cls` label, grouped by key (the name up to its first dot), in first-seen order.
fn build_shard_index(shard: &Path, file: &File, field: &str, labelled: bool) -> Result<ShardIndex> {
    use std::io::Read;
    let at = |what: String| format!("{field}: {} {what}", shard.display());
    let mut archive = tar::Archive::new(file);
    let mut keys: HashMap<String, usize> = HashMap::new();
    // Per key: its image member (offset, length) and its label, as they are found.
    type Found = (String, Option<(u64, u64)>, Option<i64>);
    let mut samples: Vec<Found> = Vec::new();
    for entry in archive
        .entries_with_seek()
        .with_context(|| at("is not a tar archive".into()))?
    {
        let mut e = entry.with_context(|| at("is damaged".into()))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = e
            .path()
            .with_context(|| at("has a bad member name".into()))?;
        let name = name.to_string_lossy().into_owned();
        let (dir, base) = name.rsplit_once('/').unwrap_or(("", &name));
        let Some((stem, ext)) = base.split_once('.') else {
            continue;
        };
        let key = match dir {
            "" => stem.to_string(),
            d => format!("{d}/{stem}"),
        };
        let ext = ext.to_ascii_lowercase();
        let slot = *keys.entry(key.clone()).or_insert_with(|| {
            samples.push((key, None, None));
            samples.len() - 1
        });
        match ext.as_str() {
            "jpg" | "jpeg" | "png" => {
                if e.size() > MAX_IMAGE_BYTES {
                    bail!(at(format!(
                        "member {name} is {} bytes, more than an image may have",
                        e.size()
                    )));
                }
                samples[slot].1 = Some((e.raw_file_position(), e.size()));
            }
            "cls" => {
                let mut text = String::new();
                e.by_ref()
                    .take(64)
                    .read_to_string(&mut text)
                    .with_context(|| at(format!("member {name} is not text")))?;
                let label = text
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|l| *l >= 0)
                    .with_context(|| {
                        at(format!(
                            "member {name} holds `{}`, not a class index",
                            text.trim()
                        ))
                    })?;
                samples[slot].2 = Some(label);
            }
            _ => {}
        }
    }
    let mut out = ShardIndex {
        samples: Vec::with_capacity(samples.len()),
        first_size: (0, 0),
    };
    for (key, image, label) in samples {
        let Some((offset, len)) = image else {
            bail!(at(format!("sample `{key}` has no .jpg or .png member")));
        };
        let label = match (label, labelled) {
            (Some(l), _) => l,
            (None, false) => -1,
            (None, true) => bail!(at(format!(
                "sample `{key}` has no .cls member (its class index); every labelled sample needs one"
            ))),
        };
        if out.samples.is_empty() {
            let mut head = vec![0u8; len.min(1 << 20) as usize];
            let n = file.read_at(&mut head, offset)?;
            out.first_size = ferry_decode::dimensions(&head[..n])
                .with_context(|| at(format!("sample `{key}`: cannot decode its image")))?;
        }
        out.samples.push((offset, len, label));
    }
    Ok(out)
}

/// What a data set's headers say, read without decoding it (a dry run's checks).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// (C, H, W) of one image, as training would see it.
    pub shape: (i64, i64, i64),
    pub samples: usize,
    /// An ImageFolder's class names.
    pub classes: Option<Vec<String>>,
}

/// Reads what `load` would load from `path` as far as headers go: a safetensors file's
/// header (names, dtypes, shapes), an ImageFolder's class directories and the size of its
/// first image, or shards' member headers. Errors are the ones `load` would give, but for
/// `data.normalize` (the caller checks it) and non-finite float pixels (not read).
pub fn probe(path: &Path, field: &'static str, spec: &DataSpec, labelled: bool) -> Result<Probe> {
    let (ix, labels, classes) = index(path, field, spec, labelled, &Indexing::cached(None), false)?;
    let spec = DataSpec {
        normalize: None,
        ..spec.clone()
    };
    let ds = Dataset::from_parts(&spec, 0, vec![(ix, labels)], classes)?;
    Ok(Probe {
        shape: ds.shape,
        samples: ds.len(),
        classes: ds.classes,
    })
}

/// A safetensors file's `images` (where they lie) and `labels` (read).
fn index_safetensors(
    path: &Path,
    field: &str,
    labelled: bool,
    scan: bool,
    ix: &Indexing,
) -> Result<(Source, Vec<i64>)> {
    use std::io::Read;
    let unreadable = || {
        format!(
            "{field}: cannot read {} as safetensors (expected tensors `images` and `labels`)",
            path.display()
        )
    };
    let mut f = File::open(path).with_context(unreadable)?;
    let file_len = f.metadata().with_context(unreadable)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(unreadable)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 || 8 + len > file_len {
        bail!("{}: a header of {len} bytes", unreadable());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).with_context(unreadable)?;
    let header: serde_json::Value = serde_json::from_slice(&header).with_context(unreadable)?;
    let data_start = 8 + len;
    // (kind, shape, absolute byte range) of a tensor, checked against the file.
    type Entry = (Kind, Vec<i64>, u64, u64);
    let tensor = |name: &str| -> Result<Option<Entry>> {
        let Some(t) = header.get(name) else {
            return Ok(None);
        };
        let parsed = (|| {
            let dtype = t.get("dtype")?.as_str()?;
            let shape = t
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_i64().filter(|d| *d >= 0))
                .collect::<Option<Vec<i64>>>()?;
            let offs = t.get("data_offsets")?.as_array()?;
            let (a, b) = (offs.first()?.as_u64()?, offs.get(1)?.as_u64()?);
            Some((dtype.to_string(), shape, a, b))
        })();
        let Some((dtype, shape, a, b)) = parsed else {
            bail!("{}: tensor `{name}` has a bad header entry", unreadable());
        };
        let kind = match dtype.as_str() {
            "U8" => Kind::Uint8,
            "I8" => Kind::Int8,
            "I16" => Kind::Int16,
            "I32" => Kind::Int,
            "I64" => Kind::Int64,
            "F16" => Kind::Half,
            "BF16" => Kind::BFloat16,
            "F32" => Kind::Float,
            "F64" => Kind::Double,
            _ => bail!("{field}: `{name}` has dtype {dtype}, which ferry does not read"),
        };
        let numel = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let bytes = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
        if bytes != Some(b.wrapping_sub(a)) || a > b || data_start + b > file_len {
            bail!(
                "{}: tensor `{name}` ({dtype} {shape:?}) does not fit its bytes in the file (truncated?)",
                unreadable()
            );
        }
        Ok(Some((kind, shape, data_start + a, data_start + b)))
    };
    let Some((kind, shape, start, end)) = tensor("images")? else {
        bail!(
            "{field}: {} must hold tensors named `images` (N,C,H,W){}",
            path.display(),
            if labelled { " and `labels` (N)" } else { "" }
        );
    };
    let (n, chw) = match shape.as_slice() {
        [n, c, h, w] => (*n, (*c, *h, *w)),
        [n, h, w] => (*n, (1, *h, *w)),
        _ => bail!(
            "{field}: `images` must have shape (N,C,H,W) or (N,H,W), got {} dimensions {shape:?}",
            shape.len()
        ),
    };
    if !matches!(
        kind,
        Kind::Uint8 | Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        bail!("{field}: `images` must be uint8 or float32, got {kind:?}");
    }
    if scan && kind != Kind::Uint8 {
        check_finite(&f, start, end, kind, |done, total| {
            ix.tick(done, Some(total), || {
                format!(
                    "checking {field} for NaN and infinity: {} of {} MB read",
                    done >> 20,
                    total >> 20
                )
            })
        })
        .with_context(|| format!("{field}: {}", path.display()))?;
    }
    let labels = match tensor("labels")? {
        Some((lk, lshape, a, b)) => {
            if lshape != [n] {
                bail!("{field}: `labels` must have shape ({n},), got {lshape:?}");
            }
            if !matches!(
                lk,
                Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
            ) {
                bail!("{field}: `labels` must be integers (int64), got {lk:?}");
            }
            let mut buf = vec![0u8; (b - a) as usize];
            f.read_exact_at(&mut buf, a).with_context(unreadable)?;
            let t = Tensor::from_data_size(&buf, &[n], lk).to_kind(Kind::Int64);
            Vec::<i64>::try_from(&t)?
        }
        None if labelled => bail!(
            "{field}: {} must hold tensors named `images` (N,C,H,W) and `labels` (N)",
            path.display()
        ),
        None => vec![-1; n as usize],
    };
    Ok((
        Source::Tensors {
            path: path.to_path_buf(),
            file: f,
            offset: start,
            kind,
            chw,
        },
        labels,
    ))
}

/// Fails if float pixels hold NaN or infinity (they make every loss NaN, and look like a
/// bad lr). Reads the tensor once, a chunk at a time.
fn check_finite(
    f: &File,
    start: u64,
    end: u64,
    kind: Kind,
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let elt = kind.elt_size_in_bytes() as u64;
    let chunk = (16u64 << 20) / elt * elt;
    let mut bad = 0i64;
    let mut at = start;
    let mut buf = Vec::new();
    while at < end {
        progress(at - start, end - start);
        let n = chunk.min(end - at);
        buf.resize(n as usize, 0);
        f.read_exact_at(&mut buf, at)?;
        let t = Tensor::from_data_size(&buf, &[(n / elt) as i64], kind);
        bad += t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
        at += n;
    }
    if bad > 0 {
        bail!("holds {bad} NaN or infinite pixel values; fix the data (they make every loss NaN)");
    }
    Ok(())
}

/// An ImageFolder's files, their labels and its class names.
type Listing = (Vec<PathBuf>, Vec<i64>, Option<Vec<String>>);

/// An ImageFolder's images and labels. Labelled: one sub-directory per class (sorted),
/// images found at any depth below it. Unlabelled: the same, or a flat directory of images.
fn folder_files(dir: &Path, field: &str, labelled: bool, ix: &Indexing) -> Result<Listing> {
    let flat = !std::fs::read_dir(dir)
        .with_context(|| format!("{field}: cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    if flat && !labelled {
        let files = class_images(dir, field, ix, 0)?;
        let n = files.len();
        return Ok((files, vec![-1; n], None));
    }
    let classes = folder_classes(dir, field)?;
    let (mut files, mut labels) = (Vec::new(), Vec::new());
    for (k, class) in classes.iter().enumerate() {
        let found = class_images(&dir.join(class), field, ix, files.len())?;
        labels.extend(std::iter::repeat_n(
            if labelled { k as i64 } else { -1 },
            found.len(),
        ));
        files.extend(found);
    }
    Ok((files, labels, labelled.then_some(classes)))
}

/// An ImageFolder's classes: its sub-directories, sorted. A member that is a link (a class
/// directory or an image) is refused: it could point anywhere, out of the data root too.
fn folder_classes(dir: &Path, field: &str) -> Result<Vec<String>> {
    let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)
        .with_context(|| format!("{field}: cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    for e in &entries {
        super::confine::no_link(e).with_context(|| field.to_string())?;
    }
    let mut classes: Vec<String> = entries
        .iter()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{field}: {} is an ImageFolder with no class sub-directories",
            dir.display()
        );
    }
    Ok(classes)
}

/// The images (PNG, JPEG) in a directory and the directories below it, sorted by path;
/// links refused.
/// `before`: images listed before this directory (for progress reports).
fn class_images(
    class_dir: &Path,
    field: &str,
    ix: &Indexing,
    before: usize,
) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![class_dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let n = before + files.len();
        ix.tick(n as u64, None, || {
            format!("indexing {field}: {n} images listed so far")
        });
        let members: Vec<std::fs::DirEntry> = std::fs::read_dir(&d)
            .with_context(|| format!("{field}: cannot read directory {}", d.display()))?
            .filter_map(|e| e.ok())
            .collect();
        for e in &members {
            super::confine::no_link(e).with_context(|| field.to_string())?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
        files.extend(members.iter().map(|e| e.path()).filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
        }));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests;
