use super::*;
use crate::train::pipeline::{Loader, Planned};
use crate::train::sampler::Sampler;
use ferry_cluster::fuzz::{mutate, Rng};
use std::sync::Arc;

fn spec(extra: serde_json::Value) -> DataSpec {
    let mut v = serde_json::json!({"train": {"path": "x"}, "channels": 1});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

fn load(path: &Path, spec: &DataSpec) -> Result<Dataset> {
    Dataset::load(path, "data.x", spec, 7, &Indexing::cached(None))
}

/// A class folder per name, one 2×2 grey PNG each, valued by class index.
fn folder(root: &Path, classes: &[&str]) -> Dataset {
    for (i, c) in classes.iter().enumerate() {
        std::fs::create_dir_all(root.join(c)).unwrap();
        image::GrayImage::from_pixel(2, 2, image::Luma([i as u8]))
            .save(root.join(c).join("x.png"))
            .unwrap();
    }
    load(root, &spec(serde_json::json!({}))).unwrap()
}

/// `n` RGB PNGs of mixed sizes in `classes` class folders, their pixels a function of the index.
fn rgb_folder(root: &Path, n: usize, classes: usize) -> Vec<(PathBuf, usize)> {
    let mut out = Vec::new();
    for i in 0..n {
        let c = i % classes;
        let dir = root.join(format!("c{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (20 + (i * 7) % 23, 16 + (i * 5) % 19);
        let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            image::Rgb([(x * 9 + i as u32) as u8, (y * 13) as u8, (i * 31) as u8])
        });
        let p = dir.join(format!("{i:05}.png"));
        img.save(&p).unwrap();
        out.push((p, c));
    }
    out
}

fn all(ds: &Dataset, view: View) -> (Tensor, Vec<i64>) {
    let idx: Vec<u32> = (0..ds.len() as u32).collect();
    let b = ds.batch(&idx, view).unwrap();
    let (x, _) = b.to_device(&ds.transform, tch::Device::Cpu);
    (x, b.labels)
}

#[test]
fn validation_classes_are_matched_to_the_training_classes_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let train = folder(&dir.path().join("train"), &["ant", "bee", "cat"]);
    // Without "bee", "cat" is still class 2 (not 1, as its own sorted index would be).
    let val = folder(&dir.path().join("val"), &["ant", "cat"])
        .matched_to(&train, "data.val")
        .unwrap();
    assert_eq!(val.labels(), &[0, 2]);
    let e = folder(&dir.path().join("bad"), &["ant", "dog"])
        .matched_to(&train, "data.val")
        .err()
        .unwrap();
    assert!(
        format!("{e:#}").contains("class `dog` is not one of data.train's classes (ant, bee, cat)"),
        "{e:#}"
    );
    // Labels without names: within the training labels' range.
    let mut numbered = folder(&dir.path().join("n"), &["0", "1"]);
    numbered.classes = None;
    let wide = folder(&dir.path().join("w"), &["a", "b", "c", "d"]);
    assert!(wide.matched_to(&numbered, "data.val").is_err());
}

/// WebDataset shards of `per` samples each in `dir`, from (image file, class) pairs in order.
fn write_shards(dir: &Path, samples: &[(PathBuf, usize)], per: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (k, chunk) in samples.chunks(per).enumerate() {
        let f = File::create(dir.join(format!("{k:06}.tar"))).unwrap();
        let mut b = tar::Builder::new(f);
        for (j, (p, c)) in chunk.iter().enumerate() {
            let key = format!("s{k}_{j:04}");
            b.append_path_with_name(p, format!("{key}.png")).unwrap();
            let cls = c.to_string();
            let mut h = tar::Header::new_gnu();
            h.set_size(cls.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{key}.cls"), cls.as_bytes())
                .unwrap();
        }
        b.finish().unwrap();
    }
}

#[test]
fn a_long_index_build_reports_how_far_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    let mut files = rgb_folder(&root, 12, 3);
    files.sort();
    write_shards(&dir.path().join("shards"), &files, 4);
    let st = dir.path().join("f.safetensors");
    let images = Tensor::zeros([64, 3, 128, 128], (Kind::Float, tch::Device::Cpu));
    let labels = Tensor::zeros([64], (Kind::Int64, tch::Device::Cpu));
    Tensor::write_safetensors(&[("images", &images), ("labels", &labels)], &st).unwrap();
    let s = spec(serde_json::json!({"channels": 3, "image_size": 24}));
    let heard = std::sync::Mutex::new(Vec::new());
    let report =
        |m: String, done: u64, total: Option<u64>| heard.lock().unwrap().push((m, done, total));
    let reports = |path: &Path| {
        heard.lock().unwrap().clear();
        let ix = Indexing::new(None, Some(&report), Duration::ZERO);
        Dataset::load(path, "data.x", &s, 7, &ix).unwrap();
        std::mem::take(&mut *heard.lock().unwrap())
    };
    // A folder: images listed so far, once per directory, counting up.
    let r = reports(&root);
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), [0, 4, 8]);
    assert!(
        r[2].0.contains("indexing data.x: 8 images listed so far"),
        "{r:?}"
    );
    assert!(r.iter().all(|x| x.2.is_none()));
    // Shards: how many of how many.
    let r = reports(&dir.path().join("shards"));
    assert_eq!(
        r.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(),
        [(0, Some(3)), (1, Some(3)), (2, Some(3))]
    );
    assert!(
        r[2].0.contains("2 of 3 shards read, 8 samples so far"),
        "{r:?}"
    );
    // Float pixels are scanned 16 MB at a time: 12 MB here, one report at the start.
    let r = reports(&st);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].2, Some(64 * 3 * 128 * 128 * 4));
    assert!(
        r[0].0
            .contains("checking data.x for NaN and infinity: 0 of 12 MB read"),
        "{r:?}"
    );
    // Reports are at most one per interval: none for a quick build.
    let ix = Indexing::new(None, Some(&report), Duration::from_secs(3600));
    Dataset::load(&root, "data.x", &s, 7, &ix).unwrap();
    assert!(heard.lock().unwrap().is_empty());
}

#[test]
fn webdataset_shards_decode_to_the_same_tensors_as_the_folder_form() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    let files = rgb_folder(&root, 30, 3);
    // Two shards in the WebDataset layout, samples in the folder's (sorted) order.
    let shards = dir.path().join("shards");
    let mut sorted = files.clone();
    sorted.sort();
    write_shards(&shards, &sorted, 17);
    let s = spec(serde_json::json!({"channels": 3, "image_size": 24}));
    let a = load(&root, &s).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let b = Dataset::load(
        &shards,
        "data.x",
        &s,
        7,
        &Indexing::cached(Some(cache.path())),
    )
    .unwrap();
    assert_eq!(a.len(), 30);
    assert_eq!(b.len(), 30);
    let (xa, la) = all(&a, View::Eval);
    let (xb, lb) = all(&b, View::Eval);
    assert_eq!(la, lb);
    assert_eq!(xa.size(), [30, 3, 24, 24]);
    assert!(xa.equal(&xb), "shards and folder decode alike");
    // The index was cached, and the cached one reads the same.
    let cached = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(cached, 2, "one index per shard");
    let c = Dataset::load(
        &shards,
        "data.x",
        &s,
        7,
        &Indexing::cached(Some(cache.path())),
    )
    .unwrap();
    assert!(all(&c, View::Eval).0.equal(&xb));
    // A sample without its label is refused with its key.
    let bad = dir.path().join("bad.tar");
    let mut t = tar::Builder::new(File::create(&bad).unwrap());
    t.append_path_with_name(&sorted[0].0, "k1.png").unwrap();
    t.finish().unwrap();
    let e = load(&bad, &s).err().unwrap();
    assert!(
        format!("{e:#}").contains("sample `k1` has no .cls member"),
        "{e:#}"
    );
}

#[test]
fn a_rank_reads_only_its_shard_and_sees_the_same_augmented_views_as_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    rgb_folder(dir.path(), 40, 4);
    let s = spec(serde_json::json!({
        "channels": 3, "image_size": 16,
        "augment": {"preset": "imagenet", "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}}
    }));
    let views = |world: usize| -> (Vec<(u32, Tensor)>, Vec<u64>) {
        let sampler = Sampler {
            len: 40,
            batch: 6,
            world,
            seed: 3,
            shuffle: true,
        };
        let order = sampler.order(1);
        let mut seen = Vec::new();
        let mut opened = Vec::new();
        for rank in 0..world {
            let ds = Arc::new(load(dir.path(), &s).unwrap());
            let plan: Vec<Planned> = (0..40)
                .step_by(sampler.global_batch())
                .map(|c| Planned {
                    indices: sampler.batch(&order, c, rank).to_vec(),
                    view: View::Train { epoch: 1 },
                })
                .collect();
            let mine: Vec<u32> = plan.iter().flat_map(|p| p.indices.clone()).collect();
            let mut loader = Loader::start(ds.clone(), plan, 2, 2);
            let mut got = Vec::new();
            while let Some(b) = loader.next_batch() {
                let b = b.unwrap();
                let (x, _) = b.to_device(&ds.transform, tch::Device::Cpu);
                got.push(x);
            }
            drop(loader);
            let x = Tensor::cat(&got, 0);
            for (k, &i) in mine.iter().enumerate() {
                seen.push((i, x.get(k as i64)));
            }
            opened.push(ds.opened.load(Ordering::Relaxed));
        }
        seen.sort_by_key(|(i, _)| *i);
        (seen, opened)
    };
    let (one, opened1) = views(1);
    let (two, opened2) = views(2);
    assert_eq!(opened1, vec![40]);
    assert_eq!(
        opened2,
        vec![20, 20],
        "each rank opened its own 20 images and no others"
    );
    assert_eq!(one.len(), 40);
    for ((i, a), (j, b)) in one.iter().zip(&two) {
        assert_eq!(i, j);
        assert!(a.equal(b), "sample {i}: the same view on 1 and 2 ranks");
    }
    // Another epoch is another view; evaluation is not augmented.
    let ds = load(dir.path(), &s).unwrap();
    let e1 = ds.batch(&[5], View::Train { epoch: 1 }).unwrap();
    let e2 = ds.batch(&[5], View::Train { epoch: 2 }).unwrap();
    assert!(!e1.images.equal(&e2.images));
    let ev = ds.batch(&[5], View::Eval).unwrap();
    assert_eq!(ev.draws[0].jitter, [1.0; 3]);
}

#[test]
fn a_corrupt_image_fails_with_its_path_or_is_left_out_with_skip_bad() {
    let dir = tempfile::tempdir().unwrap();
    let files = rgb_folder(dir.path(), 6, 2);
    let broken = &files[3].0;
    let good = std::fs::read(broken).unwrap();
    std::fs::write(broken, &good[..good.len() / 2]).unwrap();
    let s = spec(serde_json::json!({"channels": 3, "image_size": 8}));
    let ds = load(dir.path(), &s).unwrap();
    let idx: Vec<u32> = (0..6).collect();
    let e = ds.batch(&idx, View::Eval).err().unwrap();
    assert!(
        format!("{e:#}").contains(&broken.display().to_string()),
        "{e:#}"
    );
    let skip = spec(serde_json::json!({"channels": 3, "image_size": 8, "skip_bad": true}));
    let ds = load(dir.path(), &skip).unwrap();
    let b = ds.batch(&idx, View::Eval).unwrap();
    // Sorted by path: c0/00000, c0/00002, c0/00004, c1/00001, c1/00003 (broken), c1/00005.
    assert_eq!(b.kept, vec![0, 1, 2, 3, 5]);
    assert_eq!(b.images.size()[0], 5);
    assert_eq!(b.labels.len(), 5);
    assert!(
        b.skipped[0].contains(&broken.display().to_string()),
        "{:?}",
        b.skipped
    );
}

#[test]
fn memory_stays_bounded_by_the_queue_on_a_set_far_larger_than_it() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("big.safetensors");
    let n = 4000i64;
    let images = Tensor::arange(n * 64, (Kind::Int64, tch::Device::Cpu))
        .remainder(251)
        .to_kind(Kind::Uint8)
        .view([n, 1, 8, 8]);
    let labels = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).remainder(3);
    Tensor::write_safetensors(&[("images", &images), ("labels", &labels)], &st).unwrap();
    let ds = Arc::new(load(&st, &spec(serde_json::json!({}))).unwrap());
    let (batch, threads, depth) = (10usize, 2usize, 2usize);
    let plan: Vec<Planned> = (0..n as u32)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|c| Planned {
            indices: c.to_vec(),
            view: View::Eval,
        })
        .collect();
    let mut loader = Loader::start(ds.clone(), plan, threads, depth);
    for taken in 1..=20u64 {
        let b = loader.next_batch().unwrap().unwrap();
        if taken == 1 {
            // Pixels come through as stored: uint8, scaled only on the device.
            assert_eq!(b.images.kind(), Kind::Uint8);
            assert!(b.images.equal(&images.narrow(0, 0, 10)));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let read = ds.opened.load(Ordering::Relaxed);
        // Each thread holds `depth` ready batches and decodes one more.
        let bound = (taken + (threads * (depth + 1)) as u64) * batch as u64;
        assert!(
            read <= bound,
            "after {taken} batches {read} samples read (bound {bound})"
        );
    }
    assert!(ds.opened.load(Ordering::Relaxed) < 400, "of 4000");
}

#[test]
fn safetensors_samples_are_read_in_place_and_bad_values_refused() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("f.safetensors");
    let images = Tensor::from_slice(&[0.5f32, f32::NAN, 0.1, 0.2]).view([2, 1, 1, 2]);
    let labels = Tensor::from_slice(&[0i64, 1]);
    Tensor::write_safetensors(&[("images", &images), ("labels", &labels)], &st).unwrap();
    let e = load(&st, &spec(serde_json::json!({}))).err().unwrap();
    assert!(format!("{e:#}").contains("1 NaN or infinite"), "{e:#}");
    let ok = Tensor::from_slice(&[0.5f32, 0.25, 0.1, 0.2]).view([2, 1, 1, 2]);
    Tensor::write_safetensors(&[("images", &ok), ("labels", &labels)], &st).unwrap();
    let ds = load(&st, &spec(serde_json::json!({}))).unwrap();
    let b = ds.batch(&[1, 0], View::Eval).unwrap();
    assert!(b
        .images
        .equal(&Tensor::cat(&[ok.get(1), ok.get(0)], 0).view([2, 1, 1, 2])));
    assert_eq!(b.labels, vec![1, 0]);
    // Truncated: the header promises bytes the file lacks.
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 4]).unwrap();
    let e = load(&st, &spec(serde_json::json!({}))).err().unwrap();
    assert!(format!("{e:#}").contains("truncated"), "{e:#}");
}

/// Damaged safetensors files, images and shards fail with an error naming the field, never
/// a panic or an abort (which would take the test process, and a rank, down).
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
    let shard = dir.path().join("s.tar");
    let mut t = tar::Builder::new(File::create(&shard).unwrap());
    t.append_path_with_name(&png, "a.png").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_cksum();
    t.append_data(&mut h, "a.cls", &b"0"[..]).unwrap();
    t.finish().unwrap();
    drop(t);
    let good_tar = std::fs::read(&shard).unwrap();
    let s = spec(serde_json::json!({}));
    let read = |p: &Path| -> bool {
        match load(p, &s) {
            Ok(ds) => ds
                .batch(&(0..ds.len() as u32).collect::<Vec<_>>(), View::Eval)
                .is_err(),
            Err(_) => true,
        }
    };
    assert!(!read(&st) && !read(&folder) && !read(&shard));
    let mut rng = Rng(0x5eed_0003);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let (mut n, mut refused) = (0, 0);
    while std::time::Instant::now() < deadline {
        std::fs::write(&st, mutate(&mut rng, &good_st)).unwrap();
        std::fs::write(&png, mutate(&mut rng, &good_png)).unwrap();
        std::fs::write(&shard, mutate(&mut rng, &good_tar)).unwrap();
        let r = std::panic::catch_unwind(|| {
            usize::from(read(&st)) + usize::from(read(&folder)) + usize::from(read(&shard))
        });
        refused += r.unwrap_or_else(|_| panic!("input {n} panicked a reader"));
        n += 1;
    }
    eprintln!("{n} triples of damaged files, {refused} refused");
    assert!(n > 20 && refused > 0);
}

/// A teacher in index mode decodes a student's batch from its indices and `aug_seed` alone,
/// with its own threads: the same pixels as the student's view.
#[test]
fn a_teacher_recomputes_the_students_augmented_view_from_indices_and_aug_seed() {
    let dir = tempfile::tempdir().unwrap();
    rgb_folder(dir.path(), 12, 3);
    let s = spec(serde_json::json!({
        "channels": 3, "image_size": 12, "augment": "imagenet",
        "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    }));
    let student = load(dir.path(), &s).unwrap();
    let teacher = load(dir.path(), &s).unwrap();
    let idx = [7u32, 2, 11, 0, 5];
    let view = View::Train { epoch: 4 };
    let (a, _) = student
        .batch(&idx, view)
        .unwrap()
        .to_device(&student.transform, tch::Device::Cpu);
    let sent = View::from_aug_seed(view.aug_seed());
    let b = crate::train::pipeline::batch_now(&teacher, &idx, sent, 3).unwrap();
    let (b, _) = b.to_device(&teacher.transform, tch::Device::Cpu);
    assert!(a.equal(&b));
    assert_eq!(View::from_aug_seed(0), View::Eval);
}
