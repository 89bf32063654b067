//! Whether the nodes of a cluster share one outputs root. A job's output dir (checkpoints,
//! the survivors' saves, the final model) must be the same directory on every node that
//! runs it, so a cluster mounts one outputs root everywhere (NFS, a PVC). Each node writes a
//! marker of its own under the root it has (`.ferry-nodes/{node}`, a nonce made at start)
//! and publishes the nonce in its record; the coordinator places ranks only on nodes whose
//! marker it reads, unchanged, in its own root.

use std::path::{Path, PathBuf};

/// Where the markers live under the outputs root.
pub const MARKERS: &str = ".ferry-nodes";

fn marker_path(root: &Path, node: &str) -> PathBuf {
    root.join(MARKERS).join(node)
}

/// Writes this node's marker (a new nonce) under `root`; returns the nonce.
pub fn write_marker(root: &Path, node: &str) -> std::io::Result<String> {
    let nonce = format!("{:016x}", rand::random::<u64>());
    let path = marker_path(root, node);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &nonce)?;
    std::fs::rename(&tmp, &path)?;
    Ok(nonce)
}

/// Whether `node`, which published `marker`, mounts the outputs root `root` is: why not, if not.
pub fn check(root: &Path, node: &str, marker: &str) -> Result<(), String> {
    let path = marker_path(root, node);
    if marker.is_empty() {
        return Err(format!(
            "node {node} could not write to its outputs root (see its log)"
        ));
    }
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim() == marker => Ok(()),
        Ok(_) => Err(format!(
            "node {node} does not share the coordinator's outputs root ({} holds another marker: mount the same outputs root on every node)",
            path.display()
        )),
        Err(_) => Err(format!(
            "node {node} does not share the coordinator's outputs root ({} is missing: mount the same outputs root on every node)",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_shares_the_root_it_wrote_its_marker_in() {
        let (shared, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = write_marker(shared.path(), "a").unwrap();
        let b = write_marker(other.path(), "b").unwrap();
        assert!(check(shared.path(), "a", &a).is_ok());
        let e = check(shared.path(), "b", &b).unwrap_err();
        assert!(
            e.contains("node b does not share") && e.contains("missing"),
            "{e}"
        );
        // A restarted node writes a new nonce; the old one no longer counts.
        let a2 = write_marker(shared.path(), "a").unwrap();
        assert_ne!(a, a2);
        assert!(check(shared.path(), "a", &a)
            .unwrap_err()
            .contains("another marker"));
        assert!(check(shared.path(), "a", "")
            .unwrap_err()
            .contains("could not write"));
    }
}
