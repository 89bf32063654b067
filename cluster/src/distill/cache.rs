//! The student's soft-label cache. When a sample's input is deterministic (no random
//! augmentation), its soft label never changes, so the teacher is asked once per sample for
//! the whole job. Records have a fixed size, so the cache is an array indexed by sample:
//! the first samples (as many as `memory_bytes` holds) live in memory, the others in a
//! spill file read and written at fixed offsets.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Fixed-size soft-label records by sample index.
pub struct Cache {
    record: usize,
    samples: usize,
    /// Samples `0..in_memory` are held in `memory`.
    in_memory: usize,
    memory: Vec<u8>,
    present: Vec<bool>,
    spill_path: PathBuf,
    spill: Option<File>,
}

impl Cache {
    /// A cache for `samples` records of `record` bytes, holding up to `memory_bytes` in
    /// memory and the rest in `spill_path` (created on first use, removed on drop).
    pub fn new(samples: usize, record: usize, memory_bytes: usize, spill_path: PathBuf) -> Cache {
        let in_memory = (memory_bytes / record.max(1)).min(samples);
        Cache {
            record,
            samples,
            in_memory,
            memory: vec![0; in_memory * record],
            present: vec![false; samples],
            spill_path,
            spill: None,
        }
    }

    /// Whether sample `i` is cached.
    pub fn contains(&self, i: u32) -> bool {
        self.present.get(i as usize).copied().unwrap_or(false)
    }

    /// Stores sample `i`'s record.
    pub fn put(&mut self, i: u32, rec: &[u8]) -> io::Result<()> {
        let i = i as usize;
        if i >= self.samples || rec.len() != self.record {
            return Ok(()); // not cacheable: ignore
        }
        if i < self.in_memory {
            self.memory[i * self.record..(i + 1) * self.record].copy_from_slice(rec);
        } else {
            let f = match &self.spill {
                Some(f) => f,
                None => {
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .read(true)
                        .write(true)
                        .open(&self.spill_path)?;
                    self.spill.insert(f)
                }
            };
            f.write_all_at(rec, ((i - self.in_memory) * self.record) as u64)?;
        }
        self.present[i] = true;
        Ok(())
    }

    /// Sample `i`'s record, if cached.
    pub fn get(&self, i: u32) -> io::Result<Option<Vec<u8>>> {
        let i = i as usize;
        if !self.present.get(i).copied().unwrap_or(false) {
            return Ok(None);
        }
        if i < self.in_memory {
            return Ok(Some(
                self.memory[i * self.record..(i + 1) * self.record].to_vec(),
            ));
        }
        let mut rec = vec![0; self.record];
        if let Some(f) = &self.spill {
            f.read_exact_at(&mut rec, ((i - self.in_memory) * self.record) as u64)?;
        }
        Ok(Some(rec))
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if self.spill.take().is_some() {
            let _ = std::fs::remove_file(&self.spill_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_live_in_memory_then_spill_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("spill.bin");
        // 10 samples of 4 bytes, 12 bytes of memory: samples 0-2 in memory, 3-9 on disk.
        let mut c = Cache::new(10, 4, 12, spill.clone());
        assert!(!c.contains(5));
        for i in [0u32, 2, 3, 9] {
            c.put(i, &[i as u8; 4]).unwrap();
        }
        assert!(spill.exists(), "samples beyond memory spill");
        for i in [0u32, 2, 3, 9] {
            assert!(c.contains(i));
            assert_eq!(c.get(i).unwrap().unwrap(), vec![i as u8; 4]);
        }
        assert_eq!(c.get(1).unwrap(), None);
        assert!(!c.contains(1));
        // Out of range or wrong size: ignored, never a panic.
        c.put(10, &[1; 4]).unwrap();
        c.put(1, &[1; 3]).unwrap();
        assert!(!c.contains(10) && !c.contains(1));
        drop(c);
        assert!(!spill.exists(), "the spill file goes with the cache");
    }
}
