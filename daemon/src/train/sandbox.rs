//! What a rank (or teacher) process may touch once it has set up. A TorchScript model is
//! code: its `forward` can open any file the process can (`torch.from_file`) and print it
//! into the job's events. So, before it loads the model and the data, the process
//! restricts itself with Landlock (Linux 5.13+): it may read its inputs (the data and
//! models roots), the libraries it runs on and the system's read-only parts, and write only
//! its job's output dir, its node-local scratch (its `TMPDIR` is there) and `/dev/shm`. The daemon's data
//! dir (its store, other jobs' plans), other jobs' outputs, home directories, `/etc`'s
//! secrets and the config file are out of its reach. `no_new_privs` is set first (the
//! process can never gain privileges by exec).
//!
//! Not covered: the network (a model can still open sockets; run nodes on a network that
//! only the cluster uses), and CUDA jobs, whose driver and libraries touch more than can be
//! tested here: `rank_sandbox: auto` sandboxes CPU ranks only.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

// Filesystem access rights (include/uapi/linux/landlock.h).
const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;
/// Every right of ABI 1 (bits 0 to 12: execute, write, read, read dir, remove, make ...).
const ABI1: u64 = (1 << 13) - 1;
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE;
const READ: u64 = EXECUTE | READ_FILE | READ_DIR;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version of the running kernel, or None if it has no Landlock.
pub fn abi() -> Option<u32> {
    // SAFETY: with a null attribute, size 0 and the version flag, the call only returns
    // the ABI version (or -1).
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as u32)
}

/// What the process may use: read beneath `read`, read and write beneath `write`.
pub struct Policy {
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
}

impl Policy {
    /// The policy of a rank: `inputs` (the data and models roots) and the system to read,
    /// `outputs` (its output dir, its scratch) and the temporary dirs to write.
    pub fn for_rank(inputs: &[&Path], outputs: &[&Path]) -> Policy {
        let mut read: Vec<PathBuf> = inputs.iter().map(|p| p.to_path_buf()).collect();
        for p in [
            "/usr",
            "/lib",
            "/lib64",
            "/bin",
            "/sbin",
            "/opt",
            "/sys",
            "/proc/self",
            "/proc/cpuinfo",
            "/proc/meminfo",
            "/proc/stat",
            "/proc/sys/kernel",
            "/dev",
            "/etc/ld.so.cache",
            "/etc/ld.so.conf",
            "/etc/ld.so.conf.d",
            "/etc/localtime",
            "/etc/nsswitch.conf",
            "/etc/hosts",
            "/etc/resolv.conf",
            "/etc/passwd",
            "/etc/group",
            "/etc/nccl.conf",
        ] {
            read.push(PathBuf::from(p));
        }
        // The libraries this process runs on (libtorch in a venv, wherever it is), and the
        // site-packages they came from (libtorch loads some of its libraries late).
        read.extend(library_dirs());
        if let Ok(exe) = std::env::current_exe() {
            read.push(exe);
        }
        // Temporary files go to the job's own dir in its scratch (TMPDIR), not /tmp.
        let mut write: Vec<PathBuf> = outputs.iter().map(|p| p.to_path_buf()).collect();
        write.push(PathBuf::from("/dev/shm"));
        write.push(PathBuf::from("/dev/null"));
        Policy { read, write }
    }

    /// Restricts this process (every thread started after this call, and its children)
    /// to the policy. Paths that do not exist are left out.
    pub fn enforce(&self) -> Result<u32> {
        let Some(abi) = abi() else {
            bail!("this kernel has no Landlock (Linux 5.13+, enabled at boot: lsm=...,landlock)");
        };
        let mut handled = ABI1;
        if abi >= 2 {
            handled |= REFER;
        }
        if abi >= 3 {
            handled |= TRUNCATE;
        }
        let attr = RulesetAttr {
            handled_access_fs: handled,
        };
        // SAFETY: `attr` lives across the call and its size is given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            bail!(
                "landlock_create_ruleset: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let write_rights = handled;
        for (paths, rights) in [(&self.read, READ), (&self.write, write_rights)] {
            for p in paths {
                add_rule(&ruleset, p, rights & handled)?;
            }
        }
        // SAFETY: prctl with constant arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            bail!("no_new_privs: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the ruleset descriptor is valid; flags 0.
        let r =
            unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
        if r != 0 {
            bail!(
                "landlock_restrict_self: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(abi)
    }
}

/// Allows `rights` beneath `path` (only the file rights when it is a file).
fn add_rule(ruleset: &OwnedFd, path: &Path, rights: u64) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Ok(());
    };
    // SAFETY: a NUL-terminated path; O_PATH opens nothing but a handle.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Ok(()); // not on this machine
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
    let rule = PathBeneathAttr {
        allowed_access: if is_dir { rights } else { rights & FILE_RIGHTS },
        parent_fd: fd.as_raw_fd(),
    };
    // SAFETY: `rule` lives across the call; the descriptors are valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &rule as *const PathBeneathAttr,
            0u32,
        )
    };
    if r != 0 {
        bail!(
            "landlock_add_rule {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The directories of the shared libraries mapped into this process, and the
/// `site-packages` directories among their ancestors.
fn library_dirs() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        if !path.starts_with('/') || !path.contains(".so") {
            continue;
        }
        let p = Path::new(path);
        if let Some(parent) = p.parent() {
            dirs.push(parent.to_path_buf());
        }
        if let Some(i) = path.find("/site-packages/") {
            dirs.push(PathBuf::from(&path[..i + "/site-packages".len()]));
        }
    }
    dirs.sort();
    dirs.dedup();
    dirs
}
