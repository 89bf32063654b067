//! A hostile user against the roots: links planted in output dirs, paths swapped for links
//! while a job waits, ImageFolder members that point out of the data root, output dirs that
//! would overwrite a user's files or the daemon's own. Each case is refused (or made
//! harmless), nothing outside the roots is read or written, and the daemon goes on.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use ferry_cluster::api::JobPhase;
use ferry_tests::{fixtures, Daemon};

/// A short job on `train` (under the data root) writing to `out`.
fn job(name: &str, train: &str, out: &str, epochs: u32) -> String {
    format!(
        "name: {name}\nmodel: {{arch: torchscript, path: cnn4.pt}}\n\
         data: {{train: {{path: {train}}}, channels: 1}}\n\
         train: {{epochs: {epochs}, batch_size: 16, checkpoint_every_steps: 10, optimizer: {{name: sgd, lr: 0.05}}}}\n\
         resources: {{threads: 1}}\noutput: {{dir: {out}}}\n"
    )
}

fn refused(d: &Daemon, spec: &str, field: &str, says: &str) {
    let (status, body) = d.post("/v1/jobs", spec);
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], field, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(says), "{detail}");
}

/// Every file under `dir`, as (relative path, content).
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn output_dirs_with_links_or_files_are_refused_and_outside_is_untouched() {
    let d = Daemon::start();
    let out = d.out();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("m"), b"mine").unwrap();
    std::fs::create_dir_all(outside.path().join("ck/step-000000000")).unwrap();
    std::fs::write(
        outside.path().join("ck/step-000000000/manifest.json"),
        b"{}",
    )
    .unwrap();
    let before = contents(outside.path());

    // A marker that is a link (reading it would show the outside file's content).
    std::fs::create_dir_all(out.join("o1")).unwrap();
    symlink(outside.path().join("m"), out.join("o1/.ferry-job")).unwrap();
    refused(
        &d,
        &job("o1", "train.safetensors", "o1", 1),
        "output.dir",
        "not a file",
    );
    // A checkpoints dir that is a link, a final file that is a link: the dir is not empty.
    std::fs::create_dir_all(out.join("o2")).unwrap();
    symlink(outside.path().join("ck"), out.join("o2/checkpoints")).unwrap();
    refused(
        &d,
        &job("o2", "train.safetensors", "o2", 1),
        "output.dir",
        "already holds files (checkpoints)",
    );
    // A user's own directory with their model in it.
    std::fs::create_dir_all(out.join("mine")).unwrap();
    std::fs::write(out.join("mine/model.pt"), b"the user's").unwrap();
    refused(
        &d,
        &job("mine", "train.safetensors", "mine", 1),
        "output.dir",
        "never replaces files of yours",
    );
    // The outputs root itself; the output dir itself a link out.
    refused(
        &d,
        &job("root", "train.safetensors", ".", 1),
        "output.dir",
        "outputs root itself",
    );
    symlink(outside.path(), out.join("o3")).unwrap();
    refused(
        &d,
        &job("o3", "train.safetensors", "o3", 1),
        "output.dir",
        "outside the outputs root",
    );

    assert_eq!(contents(outside.path()), before);
    assert_eq!(
        std::fs::read(out.join("mine/model.pt")).unwrap(),
        b"the user's"
    );
    // The daemon is fine: a clean job runs.
    let ok = d.submit(&job("clean", "train.safetensors", "clean", 1));
    assert_eq!(
        d.wait_terminal(&ok.id, Duration::from_secs(60)).phase,
        JobPhase::Succeeded
    );
}

#[test]
fn the_output_dir_never_overlaps_the_daemons_data_dir() {
    // An outputs root that holds the daemon's data dir: no job may write in or above it.
    let tmp = std::env::temp_dir().canonicalize().unwrap();
    let d = Daemon::start_env(&[("FERRY_ROOTS__OUTPUTS", tmp.to_str().unwrap())]);
    let data_dir = d.data_dir().canonicalize().unwrap();
    for dir in [
        data_dir.join("plans"),
        data_dir.clone(),
        d.dir.path().canonicalize().unwrap(),
    ] {
        let spec = job("store", "train.safetensors", dir.to_str().unwrap(), 1);
        refused(&d, &spec, "output.dir", "data_dir");
    }
}

#[test]
fn paths_swapped_for_links_while_a_job_waits_are_refused_when_it_runs() {
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("data/train.safetensors"),
        data.path().join("train.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("data/train.safetensors"),
        data.path().join("swapped.safetensors"),
    )
    .unwrap();
    let d = Daemon::start_env(&[
        ("FERRY_MAX_RUNNING_JOBS", "1"),
        ("FERRY_ROOTS__DATA", data.path().to_str().unwrap()),
    ]);
    let out = d.out();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("data/train.safetensors"),
        outside.path().join("secret.safetensors"),
    )
    .unwrap();
    std::fs::write(outside.path().join("v"), b"outside").unwrap();
    // A long job holds the only slot; the others wait as Pending.
    let blocker = d.submit(&job("blocker", "train.safetensors", "blocker", 1000));
    d.wait_for(&blocker.id, Duration::from_secs(60), "Running", |j| {
        j.phase == JobPhase::Running
    });
    let out_swap = d.submit(&job("out-swap", "train.safetensors", "out-swap", 1));
    let data_swap = d.submit(&job("data-swap", "swapped.safetensors", "data-swap", 1));
    let ck_link = d.submit(&job("ck-link", "train.safetensors", "ck-link", 1));
    let final_link = d.submit(&job("final-link", "train.safetensors", "final-link", 1));
    // While they wait: the output dir becomes a link out; the data file too; a link is put
    // where the checkpoints go, and where the final weights go.
    std::fs::rename(out.join("out-swap"), out.join("out-swap.real")).unwrap();
    symlink(outside.path(), out.join("out-swap")).unwrap();
    std::fs::remove_file(data.path().join("swapped.safetensors")).unwrap();
    symlink(
        outside.path().join("secret.safetensors"),
        data.path().join("swapped.safetensors"),
    )
    .unwrap();
    symlink(outside.path(), out.join("ck-link/checkpoints")).unwrap();
    symlink(
        outside.path().join("v"),
        out.join("final-link/model.safetensors"),
    )
    .unwrap();
    let before = contents(outside.path());
    assert_eq!(
        d.post(&format!("/v1/jobs/{}/cancel", blocker.id), "").0,
        202
    );

    for (j, says) in [
        (&out_swap, "output.dir"),
        (&data_swap, "data.train.path"),
        (&ck_link, "checkpoints"),
    ] {
        let end = d.wait_terminal(&j.id, Duration::from_secs(120));
        assert_eq!(end.phase, JobPhase::Failed, "{}: {:?}", j.name, end.status);
        let why = end.status.failure.unwrap_or_default();
        assert!(
            why.contains(says) && why.contains("symbolic link"),
            "{}: {why}",
            j.name
        );
        // The message names the path as the user gave it, not as the rank opened it.
        assert!(!why.contains("/proc/self/fd"), "{why}");
    }
    // The final weights replace the link; the file it pointed to is untouched.
    let end = d.wait_terminal(&final_link.id, Duration::from_secs(120));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let weights = out.join("final-link/model.safetensors");
    assert!(std::fs::symlink_metadata(&weights).unwrap().is_file());
    assert_eq!(contents(outside.path()), before);
    let shown = end.status.checkpoint.unwrap_or_default();
    assert!(shown.starts_with(out.to_str().unwrap()), "{shown}");
}

#[test]
fn image_folder_members_that_are_links_are_refused() {
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("data/train.safetensors"),
        data.path().join("train.safetensors"),
    )
    .unwrap();
    let outside = tempfile::tempdir().unwrap();
    let val = fixtures().join("data/val");
    for (case, plant) in [("image", "class0/evil.png"), ("class", "class9")] {
        let root = data.path().join(format!("val-{case}"));
        for e in std::fs::read_dir(&val).unwrap().flatten() {
            let dst = root.join(e.file_name());
            std::fs::create_dir_all(&dst).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
            }
        }
        let first = std::fs::read_dir(val.join("class0"))
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        std::fs::copy(&first, outside.path().join("evil.png")).unwrap();
        let target = if case == "image" {
            outside.path().join("evil.png")
        } else {
            outside.path().to_path_buf()
        };
        symlink(target, root.join(plant)).unwrap();
    }
    let d = Daemon::start_env(&[("FERRY_ROOTS__DATA", data.path().to_str().unwrap())]);
    for case in ["image", "class"] {
        let spec = job(case, "train.safetensors", case, 1).replace(
            "channels: 1}",
            &format!("val: {{path: val-{case}}}, channels: 1}}"),
        );
        let j = d.submit(&spec);
        let end = d.wait_terminal(&j.id, Duration::from_secs(60));
        assert_eq!(end.phase, JobPhase::Failed, "{case}: {:?}", end.status);
        let why = end.status.failure.unwrap_or_default();
        assert!(
            why.contains("symbolic link") && why.contains(&format!("val-{case}")),
            "{why}"
        );
    }
}

/// Writes a model that reads `target` in its forward pass into `models`, and returns a
/// job spec that trains it.
fn reader(models: &Path, name: &str, target: &Path) -> String {
    let train = fixtures().join("data/train.safetensors");
    let out = models.join(format!("{name}.pt"));
    ferry_tests::run_python(
        "reader_model.py",
        &[
            out.to_str().unwrap(),
            target.to_str().unwrap(),
            train.to_str().unwrap(),
        ],
    );
    format!(
        "name: {name}\nmodel: {{arch: torchscript, path: {name}.pt}}\n\
         data: {{train: {{path: train.safetensors}}, channels: 1}}\n\
         train: {{epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.05}}}}\n\
         resources: {{threads: 1}}\noutput: {{dir: {name}}}\n"
    )
}

#[test]
fn a_model_cannot_read_outside_the_roots() {
    // A model is code: this one reads a file in its forward pass.
    let models = tempfile::tempdir().unwrap();
    let d = Daemon::start_env(&[("FERRY_ROOTS__MODELS", models.path().to_str().unwrap())]);
    let store = d.data_dir().join("store.redb");
    // The daemon's own store, outside every root: refused by the sandbox.
    let j = d.submit(&reader(models.path(), "steal", &store));
    let end = d.wait_terminal(&j.id, Duration::from_secs(60));
    assert_eq!(end.phase, JobPhase::Failed, "{:?}", end.status);
    let why = end.status.failure.unwrap_or_default();
    assert!(why.contains("Permission denied"), "{why}");
    let said: Vec<String> = d
        .events(&j.id)
        .events
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        said.iter().any(|m| m.starts_with("sandbox: Landlock")),
        "{said:?}"
    );
    // A file inside the data root: read as any input is.
    let train = fixtures().join("data/train.safetensors");
    let j = d.submit(&reader(models.path(), "inside", &train));
    let end = d.wait_terminal(&j.id, Duration::from_secs(60));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    drop(d);
    // The same model with the sandbox off reads the store: the refusal above was the
    // sandbox's.
    let models = tempfile::tempdir().unwrap();
    let d = Daemon::start_env(&[
        ("FERRY_ROOTS__MODELS", models.path().to_str().unwrap()),
        ("FERRY_RANK_SANDBOX", "off"),
    ]);
    let store = d.data_dir().join("store.redb");
    let j = d.submit(&reader(models.path(), "steal", &store));
    let end = d.wait_terminal(&j.id, Duration::from_secs(60));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
}

#[test]
fn ranks_run_as_rank_user_and_own_only_what_they_write() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // /proc/self belongs to the process's effective user.
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    if !root {
        eprintln!("skipped: switching the ranks' user needs root");
        return;
    }
    // A data dir other users cannot enter is refused at start, with what to do.
    let closed = tempfile::tempdir().unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut child = std::process::Command::new(ferry_tests::bin("ferryd"))
        .args(["--standalone", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(closed.path())
        .env("FERRY_RANK_USER", "nobody")
        .env_remove("FERRY_CONFIG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("ferryd started on a data dir other users cannot enter");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success() && err.contains("chmod o+x"), "{err}");

    // Inputs other users may read (the shared fixtures are the test user's own, 0600).
    let inputs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(inputs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (from, to) in [
        ("data/train.safetensors", "train.safetensors"),
        ("models/cnn4.pt", "cnn4.pt"),
    ] {
        let to = inputs.path().join(to);
        std::fs::copy(fixtures().join(from), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let root = inputs.path().to_str().unwrap();
    let d = Daemon::start_env(&[
        ("FERRY_RANK_USER", "nobody"),
        ("FERRY_ROOTS__DATA", root),
        ("FERRY_ROOTS__MODELS", root),
    ]);
    // The harness's temporary dir is 0700: let other users through, as to a real data dir.

    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let j = d.submit(&job("as-nobody", "train.safetensors", "as-nobody", 1));
    let end = d.wait_terminal(&j.id, Duration::from_secs(60));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let nobody = 65534;
    let weights = d.out().join("as-nobody/model.safetensors");
    assert_eq!(std::fs::metadata(&weights).unwrap().uid(), nobody);
    let ck = d.out().join("as-nobody/checkpoints");
    assert_eq!(std::fs::metadata(&ck).unwrap().uid(), nobody);
    // The daemon's store is still root's alone.
    assert_eq!(
        std::fs::metadata(d.data_dir().join("store.redb"))
            .unwrap()
            .uid(),
        0
    );
}

#[test]
fn damaged_torchscript_models_fail_their_job_and_nothing_else() {
    use ferry_cluster::fuzz::{mutate, Rng};
    let models = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixtures().join("models/cnn4.pt")).unwrap();
    let d = Daemon::start_env(&[
        ("FERRY_ROOTS__MODELS", models.path().to_str().unwrap()),
        ("FERRY_MAX_RUNNING_JOBS", "2"),
    ]);
    let mut rng = Rng(0x5eed_0005);
    let mut ids = Vec::new();
    for i in 0..24 {
        let name = format!("bad{i}");
        std::fs::write(
            models.path().join(format!("{name}.pt")),
            mutate(&mut rng, &good),
        )
        .unwrap();
        let spec =
            job(&name, "train.safetensors", &name, 1).replace("cnn4.pt", &format!("{name}.pt"));
        ids.push(d.submit(&spec).id);
    }
    let (mut failed, mut ok) = (0, 0);
    for id in &ids {
        let end = d.wait_terminal(id, Duration::from_secs(120));
        match end.phase {
            JobPhase::Failed => {
                failed += 1;
                assert!(end.status.failure.is_some_and(|f| !f.is_empty()));
            }
            JobPhase::Succeeded => ok += 1,
            p => panic!("{id}: {p:?}"),
        }
    }
    eprintln!("{failed} damaged models failed their job, {ok} still loaded");
    assert!(failed > 0);
    // The daemon is fine: a good model trains.
    std::fs::write(models.path().join("cnn4.pt"), &good).unwrap();
    let j = d.submit(&job("good", "train.safetensors", "good", 1));
    assert_eq!(
        d.wait_terminal(&j.id, Duration::from_secs(60)).phase,
        JobPhase::Succeeded
    );
}
