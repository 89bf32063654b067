//! The students' soft-label cache, shared by the ranks of a job on one node. When a
//! sample's input is deterministic (no random augmentation), its soft label never changes,
//! so the teacher is asked once per sample for the whole job, whichever rank meets it.
//!
//! Records have a fixed size, so the cache is a file of `samples` presence bytes followed by
//! `samples` records, mapped into every rank. The kernel's page cache is its memory; pages
//! it evicts live on in the file, on disk. A rank writes a record, then sets its presence
//! byte (release); readers check the byte (acquire) before they read. Two ranks that write
//! the same sample write the same bytes. The file's name carries its shape (samples and
//! record size), so files of other shapes are never shared, and an open file is only ever
//! grown, never truncated under another rank's mapping. The file is reused by a restarted
//! attempt of the same job (same spec, same teacher) and removed at the end of the job.

#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use memmap2::MmapMut;

const MAGIC: &[u8; 8] = b"FRYSL001";
/// magic, samples (u64), record bytes (u64).
const HEADER: usize = 24;

/// Fixed-size soft-label records by sample index, shared through a mapped file.
pub struct Cache {
    map: MmapMut,
    record: usize,
    samples: usize,
    path: PathBuf,
}

impl Cache {
    /// The file for `samples` records of `record` bytes: `base` with the shape appended.
    pub fn file_for(base: &Path, samples: usize, record: usize) -> PathBuf {
        PathBuf::from(format!("{}.{samples}x{record}", base.display()))
    }

    /// Opens, creating it if needed, the cache for `samples` records of `record` bytes at
    /// [`Cache::file_for`]`(base, ..)`.
    pub fn open(base: &Path, samples: usize, record: usize) -> io::Result<Cache> {
        let path = Self::file_for(base, samples, record);
        let len = (HEADER + samples + samples * record) as u64;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let current = file.metadata()?.len();
        if current > len {
            return Err(io::Error::other(format!(
                "{} has {current} bytes, more than its shape allows ({len})",
                path.display()
            )));
        }
        if current < len {
            // New: every rank grows it to the same length (growing keeps what is written).
            file.set_len(len)?;
        }
        // SAFETY: the file has `len` bytes and is never shortened while mapped; the protocol
        // in the module docs orders the accesses to each record.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&(samples as u64).to_le_bytes());
        header[16..24].copy_from_slice(&(record as u64).to_le_bytes());
        if map[..HEADER] != header {
            // Every opener writes the same bytes.
            map[..HEADER].copy_from_slice(&header);
        }
        Ok(Cache {
            map,
            record,
            samples,
            path,
        })
    }

    fn presence(&self, i: usize) -> &AtomicU8 {
        // SAFETY: the byte is inside the mapping, and AtomicU8 has u8's layout.
        unsafe { &*(self.map.as_ptr().add(HEADER + i) as *const AtomicU8) }
    }

    fn offset(&self, i: usize) -> usize {
        HEADER + self.samples + i * self.record
    }

    /// Whether sample `i` is cached (by any rank).
    pub fn contains(&self, i: u32) -> bool {
        (i as usize) < self.samples && self.presence(i as usize).load(Ordering::Acquire) == 1
    }

    /// Stores sample `i`'s record.
    pub fn put(&mut self, i: u32, rec: &[u8]) -> io::Result<()> {
        let i = i as usize;
        if i >= self.samples || rec.len() != self.record {
            return Ok(()); // not cacheable: ignore
        }
        let at = self.offset(i);
        self.map[at..at + self.record].copy_from_slice(rec);
        self.presence(i).store(1, Ordering::Release);
        Ok(())
    }

    /// Sample `i`'s record, if cached.
    pub fn get(&self, i: u32) -> io::Result<Option<Vec<u8>>> {
        if !self.contains(i) {
            return Ok(None);
        }
        let at = self.offset(i as usize);
        Ok(Some(self.map[at..at + self.record].to_vec()))
    }

    /// Removes the file (the job is over; mappings stay valid until dropped).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_share_records_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("softlabels.cache");
        assert_eq!(
            Cache::file_for(&path, 10, 4),
            dir.path().join("softlabels.cache.10x4")
        );
        // Two ranks of one job open the same cache.
        let mut a = Cache::open(&path, 10, 4).unwrap();
        let mut b = Cache::open(&path, 10, 4).unwrap();
        assert!(!a.contains(5));
        a.put(5, &[5; 4]).unwrap();
        b.put(9, &[9; 4]).unwrap();
        assert!(b.contains(5) && a.contains(9));
        assert_eq!(b.get(5).unwrap().unwrap(), vec![5; 4]);
        assert_eq!(a.get(9).unwrap().unwrap(), vec![9; 4]);
        assert_eq!(a.get(1).unwrap(), None);
        // Out of range or wrong size: ignored, never a panic.
        a.put(10, &[1; 4]).unwrap();
        a.put(1, &[1; 3]).unwrap();
        assert!(!a.contains(10) && !a.contains(1));
        drop((a, b));
        // A restarted attempt finds what was fetched; another shape has a file of its own.
        let again = Cache::open(&path, 10, 4).unwrap();
        assert!(again.contains(5) && again.contains(9));
        let other = Cache::open(&path, 10, 8).unwrap();
        assert!(!other.contains(5));
        other.remove();
        again.remove();
        assert!(!Cache::file_for(&path, 10, 4).exists());
        assert!(!Cache::file_for(&path, 10, 8).exists());
    }
}
