//! Shared memory between a rank and the next one when both run on the same host: the
//! ring's bulk data goes through a mapped file in `/dev/shm` instead of the loopback TCP
//! stack, which saves a copy into and out of the kernel per byte. The TCP connection stays:
//! it carries the small "chunk ready" and "slot free" messages, so a dead peer still fails
//! the operation at once, and timeouts still apply.
//!
//! The region has `SLOTS` slots of `slot_bytes`. The writer fills a slot, then announces it
//! over TCP; the reader reduces straight from the slot, then returns a credit over TCP. A
//! slot is only ever touched by one side at a time, and the TCP messages between the two
//! accesses (system calls on both sides) order them.

#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

/// Slots per region: how many chunks the writer may be ahead of the reader.
pub const SLOTS: usize = 4;

/// The writer's end: a region this rank created for the next rank to read.
pub struct ShmOut {
    map: MmapMut,
    slot_bytes: usize,
    path: PathBuf,
    linked: bool,
}

/// The reader's end: the previous rank's region, mapped.
pub struct ShmIn {
    map: MmapMut,
    slot_bytes: usize,
}

fn region_len(slot_bytes: usize) -> usize {
    SLOTS * slot_bytes
}

impl ShmOut {
    /// Creates a region in `/dev/shm` (or the temp dir where there is none).
    pub fn create(slot_bytes: usize, tag: &str) -> std::io::Result<ShmOut> {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "ferry-ring-{tag}-{}-{:016x}",
            std::process::id(),
            rand_u64()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.set_len(region_len(slot_bytes) as u64)?;
        // SAFETY: the file was just created by this process with the mapped length; only
        // the protocol in this module's docs touches it (one side per slot at a time).
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(ShmOut {
            map,
            slot_bytes,
            path,
            linked: true,
        })
    }

    /// Where the next rank opens it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file once the reader has mapped it (the mappings stay valid).
    pub fn unlink(&mut self) {
        if self.linked {
            let _ = std::fs::remove_file(&self.path);
            self.linked = false;
        }
    }

    /// Copies `data` into slot `slot`.
    pub fn put(&mut self, slot: usize, data: &[u8]) {
        let start = slot * self.slot_bytes;
        self.map[start..start + data.len()].copy_from_slice(data);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
}

impl Drop for ShmOut {
    fn drop(&mut self) {
        self.unlink();
    }
}

impl ShmIn {
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Maps the previous rank's region at `path` (fails on another host: no such file).
    ///
    /// The path comes from a peer: only a region as [`ShmOut::create`] names them, in the
    /// directory it makes them in, a regular file of this process's user (no link) is
    /// opened, so a peer cannot have a rank map (and write) some other file.
    pub fn open(path: &Path, slot_bytes: usize) -> std::io::Result<ShmIn> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let refuse = || std::io::Error::other("not a ferry ring region");
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ferry-ring-") && !n.contains('/'));
        let dir = path.parent().ok_or_else(refuse)?;
        let home = dir == Path::new("/dev/shm") || dir == std::env::temp_dir();
        if !named || !home {
            return Err(refuse());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let meta = file.metadata()?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != me {
            return Err(refuse());
        }
        if meta.len() != region_len(slot_bytes) as u64 {
            return Err(std::io::Error::other("shared region has the wrong size"));
        }
        // SAFETY: the writer created the file with this length and never truncates it; the
        // protocol in this module's docs keeps each slot with one side at a time.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(ShmIn { map, slot_bytes })
    }

    /// The first `len` f32 values of slot `slot`.
    pub fn values(&self, slot: usize, len: usize) -> &[f32] {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let start = slot * self.slot_bytes;
        // Slots start at multiples of slot_bytes (a multiple of 4) in a page-aligned map.
        bytemuck::cast_slice(&self.map[start..start + len * 4])
    }
}

/// Random bits for unique region names, without a dependency on a generator.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_carries_values_and_its_file_goes_away() {
        let mut out = ShmOut::create(64, "test").unwrap();
        let inp = ShmIn::open(out.path(), 64).unwrap();
        assert!(ShmIn::open(out.path(), 32).is_err(), "size is checked");
        let vals = [1.5f32, -2.0, 3.25];
        out.put(2, bytemuck::cast_slice(&vals));
        let path = out.path().to_path_buf();
        out.unlink();
        assert!(!path.exists());
        // The mappings outlive the file.
        assert_eq!(inp.values(2, 3), &vals);
        out.put(3, bytemuck::cast_slice(&[7.0f32]));
        assert_eq!(inp.values(3, 1), &[7.0]);
    }
}
