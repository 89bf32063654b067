//! Data sets: a safetensors file (`images` N×C×H×W, uint8 or float32; `labels` N, int64)
//! or an ImageFolder directory (one sub-directory per class, sorted names give indices).
//! Everything is held in memory as float32 in [0, 1], then normalised.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_cluster::spec::DataSpec;
use tch::{Kind, Tensor};

/// An in-memory labelled data set.
pub struct Dataset {
    /// N×C×H×W float32.
    pub images: Tensor,
    /// N int64.
    pub labels: Tensor,
    /// Class names of an ImageFolder (None for safetensors).
    pub classes: Option<Vec<String>>,
}

impl Dataset {
    /// Whether it holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// (C, H, W) of one image.
    pub fn shape(&self) -> (i64, i64, i64) {
        let s = self.images.size();
        (s[1], s[2], s[3])
    }

    /// The largest label plus one.
    pub fn label_count(&self) -> i64 {
        if self.is_empty() {
            0
        } else {
            self.labels.max().int64_value(&[]) + 1
        }
    }

    /// Loads `path` (the `field` of the spec, for messages) per the data spec.
    pub fn load(path: &Path, field: &str, spec: &DataSpec) -> Result<Dataset> {
        Self::load_with(path, field, spec, true)
    }

    /// Loads a data set whose labels are optional: every sample gets label -1 (unlabelled
    /// images, learned from a teacher). An ImageFolder's class directories are ignored.
    pub fn load_unlabelled(path: &Path, field: &str, spec: &DataSpec) -> Result<Dataset> {
        let mut ds = Self::load_with(path, field, spec, false)?;
        ds.labels = Tensor::full([ds.len() as i64], -1, (Kind::Int64, tch::Device::Cpu));
        ds.classes = None;
        Ok(ds)
    }

    /// The training set of a job: `data.train`, followed by `data.unlabelled` (label -1)
    /// when there is one. Students and teachers index samples in this order.
    pub fn load_training(spec: &DataSpec) -> Result<Dataset> {
        let train = Dataset::load(Path::new(&spec.train.path), "data.train", spec)?;
        let Some(u) = &spec.unlabelled else {
            return Ok(train);
        };
        let pool = Dataset::load_unlabelled(Path::new(&u.path), "data.unlabelled", spec)?;
        if pool.shape() != train.shape() {
            bail!(
                "data.unlabelled images are {:?} but data.train images are {:?} (C,H,W); set data.image_size",
                pool.shape(),
                train.shape()
            );
        }
        if train.len() + pool.len() > u32::MAX as usize {
            bail!("data.train and data.unlabelled together exceed 2^32 samples");
        }
        Ok(Dataset {
            images: Tensor::cat(&[train.images, pool.images], 0),
            labels: Tensor::cat(&[train.labels, pool.labels], 0),
            classes: train.classes,
        })
    }

    /// This validation set, labelled as `train` labels its classes. ImageFolder classes are
    /// matched by name: a class the training set lacks is refused (the model was never
    /// trained on it), one the validation set lacks is simply absent. Without class names on
    /// the training side (safetensors), the validation labels must stay within the ones the
    /// training labels reach.
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
                self.labels = Tensor::from_slice(&index).index_select(0, &self.labels);
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
        Ok(self)
    }

    /// Samples with a label (>= 0).
    pub fn labelled(&self) -> usize {
        self.labels.ge(0).sum(Kind::Int64).int64_value(&[]) as usize
    }

    fn load_with(path: &Path, field: &str, spec: &DataSpec, labelled: bool) -> Result<Dataset> {
        let mut ds = if path.is_dir() {
            load_image_folder(path, field, spec)?
        } else {
            load_safetensors(path, field, labelled)?
        };
        if ds.is_empty() {
            bail!("{field}: {} holds no samples", path.display());
        }
        if labelled && ds.labels.min().int64_value(&[]) < 0 {
            bail!("{field}: labels must be class indices >= 0");
        }
        if let Some(n) = &spec.normalize {
            let c = ds.shape().0 as usize;
            if n.mean.len() != c {
                bail!(
                    "data.normalize: {} mean values for {c}-channel images from {field}",
                    n.mean.len()
                );
            }
            let mean = Tensor::from_slice(&n.mean)
                .to_kind(Kind::Float)
                .view([1, c as i64, 1, 1]);
            let std = Tensor::from_slice(&n.std)
                .to_kind(Kind::Float)
                .view([1, c as i64, 1, 1]);
            ds.images = (ds.images - mean) / std;
        }
        Ok(ds)
    }
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
/// header (names, dtypes, shapes), or an ImageFolder's class directories and the size of
/// its first image. Errors are the ones `load` would give (`data.normalize` aside).
pub fn probe(path: &Path, field: &str, spec: &DataSpec, labelled: bool) -> Result<Probe> {
    let probe = if path.is_dir() {
        probe_image_folder(path, field, spec)?
    } else {
        probe_safetensors(path, field, labelled)?
    };
    if probe.samples == 0 {
        bail!("{field}: {} holds no samples", path.display());
    }
    Ok(probe)
}

fn probe_safetensors(path: &Path, field: &str, labelled: bool) -> Result<Probe> {
    use std::io::Read;
    let unreadable = || {
        format!(
            "{field}: cannot read {} as safetensors (expected tensors `images` and `labels`)",
            path.display()
        )
    };
    let mut f = std::fs::File::open(path).with_context(unreadable)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(unreadable)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!("{}: a header of {len} bytes", unreadable());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).with_context(unreadable)?;
    let header: serde_json::Value = serde_json::from_slice(&header).with_context(unreadable)?;
    let tensor = |name: &str| -> Option<(String, Vec<i64>)> {
        let t = header.get(name)?;
        let dtype = t.get("dtype")?.as_str()?.to_string();
        let shape = t
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_i64())
            .collect::<Option<Vec<i64>>>()?;
        Some((dtype, shape))
    };
    let Some((dtype, shape)) = tensor("images") else {
        bail!(
            "{field}: {} must hold tensors named `images` (N,C,H,W){}",
            path.display(),
            if labelled { " and `labels` (N)" } else { "" }
        );
    };
    let shape3 = match shape.as_slice() {
        [_, c, h, w] => (*c, *h, *w),
        [_, h, w] => (1, *h, *w),
        _ => bail!(
            "{field}: `images` must have shape (N,C,H,W) or (N,H,W), got {} dimensions {shape:?}",
            shape.len()
        ),
    };
    if !matches!(dtype.as_str(), "U8" | "F32" | "F64" | "F16" | "BF16") {
        bail!("{field}: `images` must be uint8 or float32, got {dtype}");
    }
    let n = shape[0];
    match tensor("labels") {
        Some((dtype, shape)) => {
            if shape != [n] {
                bail!("{field}: `labels` must have shape ({n},), got {shape:?}");
            }
            if !matches!(dtype.as_str(), "I64" | "I32" | "I16" | "I8" | "U8") {
                bail!("{field}: `labels` must be integers (int64), got {dtype}");
            }
        }
        None if labelled => bail!(
            "{field}: {} must hold tensors named `images` (N,C,H,W) and `labels` (N)",
            path.display()
        ),
        None => {}
    }
    Ok(Probe {
        shape: shape3,
        samples: n.max(0) as usize,
        classes: None,
    })
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

/// The images (PNG, JPEG) of one class directory, sorted; links refused.
fn class_images(class_dir: &Path, field: &str) -> Result<Vec<std::path::PathBuf>> {
    let members: Vec<std::fs::DirEntry> = std::fs::read_dir(class_dir)
        .with_context(|| format!("{field}: cannot read directory {}", class_dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    for e in &members {
        super::confine::no_link(e).with_context(|| field.to_string())?;
    }
    let mut files: Vec<_> = members
        .iter()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn probe_image_folder(dir: &Path, field: &str, spec: &DataSpec) -> Result<Probe> {
    let channels = i64::from(spec.channels.unwrap_or(3));
    let classes = folder_classes(dir, field)?;
    let (mut samples, mut first) = (0usize, None);
    for class in &classes {
        let files = class_images(&dir.join(class), field)?;
        samples += files.len();
        if first.is_none() {
            first = files.into_iter().next();
        }
    }
    let (h, w) = match (spec.image_size, &first) {
        (Some(s), _) => (i64::from(s), i64::from(s)),
        (None, Some(f)) => {
            let (w, h) = image::image_dimensions(f)
                .with_context(|| format!("{field}: cannot decode image {}", f.display()))?;
            (i64::from(h), i64::from(w))
        }
        (None, None) => (0, 0),
    };
    Ok(Probe {
        shape: (channels, h, w),
        samples,
        classes: Some(classes),
    })
}

fn load_safetensors(path: &Path, field: &str, labelled: bool) -> Result<Dataset> {
    let tensors = Tensor::read_safetensors(path).with_context(|| {
        format!(
            "{field}: cannot read {} as safetensors (expected tensors `images` and `labels`)",
            path.display()
        )
    })?;
    let mut images = None;
    let mut labels = None;
    for (name, t) in tensors {
        match name.as_str() {
            "images" => images = Some(t),
            "labels" => labels = Some(t),
            _ => {}
        }
    }
    let labels = match (labels, &images) {
        (Some(l), _) => Some(l),
        (None, Some(i)) if !labelled => Some(Tensor::zeros(
            [i.size()[0]],
            (Kind::Int64, tch::Device::Cpu),
        )),
        _ => None,
    };
    let (Some(images), Some(labels)) = (images, labels) else {
        bail!(
            "{field}: {} must hold tensors named `images` (N,C,H,W){}",
            path.display(),
            if labelled { " and `labels` (N)" } else { "" }
        );
    };
    let images = match images.dim() {
        4 => images,
        3 => images.unsqueeze(1),
        d => bail!(
            "{field}: `images` must have shape (N,C,H,W) or (N,H,W), got {d} dimensions {:?}",
            images.size()
        ),
    };
    let images = match images.kind() {
        Kind::Uint8 => images.to_kind(Kind::Float) / 255.0,
        Kind::Float => images,
        Kind::Double | Kind::Half | Kind::BFloat16 => images.to_kind(Kind::Float),
        k => bail!("{field}: `images` must be uint8 or float32, got {k:?}"),
    };
    // NaN or infinite pixels would make the loss NaN at once, and look like a bad lr.
    let bad = images
        .isfinite()
        .logical_not()
        .sum(Kind::Int64)
        .int64_value(&[]);
    if bad > 0 {
        bail!(
            "{field}: {} holds {bad} NaN or infinite pixel values; fix the data (they make every loss NaN)",
            path.display()
        );
    }
    if labels.dim() != 1 || labels.size()[0] != images.size()[0] {
        bail!(
            "{field}: `labels` must have shape ({},), got {:?}",
            images.size()[0],
            labels.size()
        );
    }
    let labels = match labels.kind() {
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 => {
            labels.to_kind(Kind::Int64)
        }
        k => bail!("{field}: `labels` must be integers (int64), got {k:?}"),
    };
    Ok(Dataset {
        images: images.contiguous(),
        labels,
        classes: None,
    })
}

fn load_image_folder(dir: &Path, field: &str, spec: &DataSpec) -> Result<Dataset> {
    let channels = spec.channels.unwrap_or(3) as usize;
    let classes = folder_classes(dir, field)?;
    let mut pixels: Vec<u8> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut size: Option<(u32, u32)> = spec.image_size.map(|s| (s, s));
    for (idx, class) in classes.iter().enumerate() {
        for f in class_images(&dir.join(class), field)? {
            let img = image::open(&f)
                .with_context(|| format!("{field}: cannot decode image {}", f.display()))?;
            let (w, h) = *size.get_or_insert((img.width(), img.height()));
            let img = if (img.width(), img.height()) != (w, h) {
                if spec.image_size.is_none() {
                    bail!(
                        "{field}: {} is {}x{}, others {w}x{h}; set data.image_size to resize",
                        f.display(),
                        img.width(),
                        img.height()
                    );
                }
                img.resize_exact(w, h, image::imageops::FilterType::Triangle)
            } else {
                img
            };
            if channels == 1 {
                pixels.extend_from_slice(img.to_luma8().as_raw());
            } else {
                pixels.extend_from_slice(img.to_rgb8().as_raw());
            }
            labels.push(idx as i64);
        }
    }
    let (w, h) = size.unwrap_or((0, 0));
    let n = labels.len() as i64;
    let images = Tensor::from_slice(&pixels)
        .view([n, h as i64, w as i64, channels as i64])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    Ok(Dataset {
        images: images.contiguous(),
        labels: Tensor::from_slice(&labels),
        classes: Some(classes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::fuzz::{mutate, Rng};

    fn spec() -> DataSpec {
        serde_json::from_value(serde_json::json!({"train": {"path": "x"}, "channels": 1})).unwrap()
    }

    fn folder(root: &Path, classes: &[&str]) -> Dataset {
        for (i, c) in classes.iter().enumerate() {
            std::fs::create_dir_all(root.join(c)).unwrap();
            image::GrayImage::from_pixel(2, 2, image::Luma([i as u8]))
                .save(root.join(c).join("x.png"))
                .unwrap();
        }
        load_image_folder(root, "data.x", &spec()).unwrap()
    }

    #[test]
    fn validation_classes_are_matched_to_the_training_classes_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let train = folder(&dir.path().join("train"), &["ant", "bee", "cat"]);
        // Without "bee", "cat" is still class 2 (not 1, as its own sorted index would be).
        let val = folder(&dir.path().join("val"), &["ant", "cat"])
            .matched_to(&train, "data.val")
            .unwrap();
        assert_eq!(Vec::<i64>::try_from(&val.labels).unwrap(), vec![0, 2]);
        let e = folder(&dir.path().join("bad"), &["ant", "dog"])
            .matched_to(&train, "data.val")
            .err()
            .unwrap();
        assert!(
            format!("{e:#}")
                .contains("class `dog` is not one of data.train's classes (ant, bee, cat)"),
            "{e:#}"
        );
        // Labels without names: within the training labels' range.
        let mut numbered = folder(&dir.path().join("n"), &["0", "1"]);
        numbered.classes = None;
        let wide = folder(&dir.path().join("w"), &["a", "b", "c", "d"]);
        assert!(wide.matched_to(&numbered, "data.val").is_err());
    }

    /// Damaged safetensors files and images fail with an error naming the field, never a
    /// panic or an abort (which would take the test process, and a rank, down).
    #[test]
    fn damaged_data_files_fail_with_an_error_never_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("d.safetensors");
        let images = Tensor::zeros([4, 1, 4, 4], (Kind::Uint8, tch::Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 0, 1]);
        Tensor::write_safetensors(&[("images", images), ("labels", labels)], &st).unwrap();
        let good_st = std::fs::read(&st).unwrap();
        let folder = dir.path().join("folder");
        std::fs::create_dir_all(folder.join("c0")).unwrap();
        let png = folder.join("c0/x.png");
        image::GrayImage::from_pixel(4, 4, image::Luma([9u8]))
            .save(&png)
            .unwrap();
        let good_png = std::fs::read(&png).unwrap();
        assert!(load_safetensors(&st, "data.train", true).is_ok());
        assert!(load_image_folder(&folder, "data.train", &spec()).is_ok());
        let mut rng = Rng(0x5eed_0003);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let (mut n, mut refused) = (0, 0);
        while std::time::Instant::now() < deadline {
            std::fs::write(&st, mutate(&mut rng, &good_st)).unwrap();
            std::fs::write(&png, mutate(&mut rng, &good_png)).unwrap();
            let r = std::panic::catch_unwind(|| {
                let a = load_safetensors(&st, "data.train", true).is_err();
                let b = load_image_folder(&folder, "data.train", &spec()).is_err();
                usize::from(a) + usize::from(b)
            });
            refused += r.unwrap_or_else(|_| panic!("input {n} panicked a reader"));
            n += 1;
        }
        eprintln!("{n} pairs of damaged files, {refused} refused");
        assert!(n > 20 && refused > 0);
    }
}
