//! What CUDA ranks need from the daemon: NCCL found on this node, and one GPU each.
//!
//! cudarc loads NCCL by the names `libnccl.so`, `libnccl.so.12`, ... but the PyTorch wheel
//! ships only `libnccl.so.2`. The daemon finds that file (the configured `nccl_library`,
//! else the `nvidia/nccl/lib` of the torch wheel whose libtorch is in use), links it as
//! `<data_dir>/lib/libnccl.so`, and puts that directory first on each CUDA rank's
//! `LD_LIBRARY_PATH` (read by the dynamic loader at process start, so it is set at spawn).

use std::path::{Path, PathBuf};

/// `libnccl.so.2` beside a libtorch directory (`.../site-packages/torch/lib`).
fn beside_libtorch(torch_lib: &Path) -> Option<PathBuf> {
    let site = torch_lib.parent()?.parent()?;
    let p = site.join("nvidia/nccl/lib/libnccl.so.2");
    p.is_file().then_some(p)
}

/// Finds `libnccl.so.2`: `configured` (which must exist), else beside the libtorch this
/// binary was built against, else beside any `torch/lib` on `LD_LIBRARY_PATH`.
pub fn find_nccl(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("nccl_library {} is not a file", p.display()))
        };
    }
    let mut dirs = vec![PathBuf::from(env!("FERRY_LIBTORCH_LIB"))];
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths));
    }
    dirs.iter()
        .find_map(|d| beside_libtorch(d))
        .ok_or_else(|| {
            "libnccl.so.2 not found beside libtorch (torch wheel's nvidia/nccl/lib); set nccl_library in ferryd's config".to_string()
        })
}

/// Links `lib` as `<data_dir>/lib/libnccl.so`; returns the directory to put on
/// `LD_LIBRARY_PATH`.
pub fn nccl_link_dir(data_dir: &Path, lib: &Path) -> std::io::Result<PathBuf> {
    let dir = data_dir.join("lib");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib, &link)?;
    Ok(dir)
}

/// `LD_LIBRARY_PATH` with `dir` first.
pub fn library_path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// The GPU rank `rank` of `world` gets: one of the visible devices each (the parent's
/// `CUDA_VISIBLE_DEVICES` list, or indices 0..). A single rank keeps what it sees.
pub fn visible_device(rank: usize, world: usize) -> Option<String> {
    if world <= 1 {
        return None;
    }
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => {
            list.split(',').nth(rank).map(|s| s.trim().to_string())
        }
        _ => Some(rank.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_is_found_in_a_torch_wheel_layout_and_linked() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site-packages");
        std::fs::create_dir_all(site.join("torch/lib")).unwrap();
        std::fs::create_dir_all(site.join("nvidia/nccl/lib")).unwrap();
        let lib = site.join("nvidia/nccl/lib/libnccl.so.2");
        std::fs::write(&lib, b"").unwrap();
        assert_eq!(beside_libtorch(&site.join("torch/lib")), Some(lib.clone()));
        assert_eq!(beside_libtorch(dir.path()), None);
        assert_eq!(find_nccl(Some(&lib)).unwrap(), lib);
        assert!(find_nccl(Some(&dir.path().join("nope"))).is_err());
        let linked = nccl_link_dir(&dir.path().join("data"), &lib).unwrap();
        assert_eq!(std::fs::read_link(linked.join("libnccl.so")).unwrap(), lib);
        // Linking again replaces the link.
        nccl_link_dir(&dir.path().join("data"), &lib).unwrap();
    }

    #[test]
    fn each_rank_of_a_multi_gpu_job_sees_one_device() {
        assert_eq!(visible_device(0, 1), None);
        // The test process's own CUDA_VISIBLE_DEVICES decides the list; without one, indices.
        if std::env::var_os("CUDA_VISIBLE_DEVICES").is_none() {
            assert_eq!(visible_device(1, 2).as_deref(), Some("1"));
        }
    }
}
