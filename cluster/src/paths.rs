//! Confinement of spec paths to the configured roots.
//!
//! A path in a spec is relative to the root of its kind (data, models, outputs) or absolute
//! inside it. `..` is refused outright, and symbolic links are resolved before the check,
//! so a link that points out of a root is refused too.

use std::path::{Component, Path, PathBuf};

/// The kinds of root a spec path can live under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    Data,
    Models,
    Outputs,
}

impl RootKind {
    fn name(self) -> &'static str {
        match self {
            RootKind::Data => "data",
            RootKind::Models => "models",
            RootKind::Outputs => "outputs",
        }
    }
}

/// The directories spec paths are confined to (canonical once built with [`Roots::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    pub data: PathBuf,
    pub models: PathBuf,
    pub outputs: PathBuf,
}

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("`{path}` contains `..`; give a path inside the {kind} root ({root})")]
    ParentComponent {
        path: String,
        kind: &'static str,
        root: String,
    },
    #[error("`{path}` is outside the {kind} root ({root}); move the file under it or configure roots.{kind}")]
    OutsideRoot {
        path: String,
        kind: &'static str,
        root: String,
    },
    #[error("`{path}` does not exist under the {kind} root ({root})")]
    NotFound {
        path: String,
        kind: &'static str,
        root: String,
    },
    #[error("cannot use the {kind} root {root}: {reason}")]
    BadRoot {
        kind: &'static str,
        root: String,
        reason: String,
    },
}

impl Roots {
    /// Canonicalises the roots, creating the outputs root if needed.
    pub fn new(data: &Path, models: &Path, outputs: &Path) -> Result<Roots, PathError> {
        let canon = |p: &Path, kind: RootKind| {
            if kind == RootKind::Outputs {
                std::fs::create_dir_all(p).map_err(|e| PathError::BadRoot {
                    kind: kind.name(),
                    root: p.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
            p.canonicalize().map_err(|e| PathError::BadRoot {
                kind: kind.name(),
                root: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        Ok(Roots {
            data: canon(data, RootKind::Data)?,
            models: canon(models, RootKind::Models)?,
            outputs: canon(outputs, RootKind::Outputs)?,
        })
    }

    /// The root of `kind`.
    pub fn root(&self, kind: RootKind) -> &Path {
        match kind {
            RootKind::Data => &self.data,
            RootKind::Models => &self.models,
            RootKind::Outputs => &self.outputs,
        }
    }

    /// Resolves `user_path` under the root of `kind`. With `must_exist`, the path must exist;
    /// otherwise its deepest existing ancestor is checked (an output dir made later).
    pub fn resolve(
        &self,
        kind: RootKind,
        user_path: &str,
        must_exist: bool,
    ) -> Result<PathBuf, PathError> {
        let root = self.root(kind);
        let err_root = || root.display().to_string();
        let p = Path::new(user_path);
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(PathError::ParentComponent {
                path: user_path.into(),
                kind: kind.name(),
                root: err_root(),
            });
        }
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        // Resolve links on the longest prefix that exists; the rest cannot be a link yet.
        let mut existing = joined.clone();
        let mut rest = Vec::new();
        let canonical = loop {
            match existing.canonicalize() {
                Ok(c) => break c,
                Err(_) => {
                    if must_exist {
                        return Err(PathError::NotFound {
                            path: user_path.into(),
                            kind: kind.name(),
                            root: err_root(),
                        });
                    }
                    match (
                        existing.file_name().map(|n| n.to_os_string()),
                        existing.parent(),
                    ) {
                        (Some(name), Some(parent)) => {
                            rest.push(name);
                            existing = parent.to_path_buf();
                        }
                        _ => {
                            return Err(PathError::OutsideRoot {
                                path: user_path.into(),
                                kind: kind.name(),
                                root: err_root(),
                            })
                        }
                    }
                }
            }
        };
        if !canonical.starts_with(root) {
            return Err(PathError::OutsideRoot {
                path: user_path.into(),
                kind: kind.name(),
                root: err_root(),
            });
        }
        let mut full = canonical;
        for name in rest.into_iter().rev() {
            full.push(name);
        }
        Ok(full)
    }
}

/// Why a path could not be opened beneath its root at the time of use.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    #[error("{path}: {component} is a symbolic link; ferry follows no link below its roots (replace it with the directory or file itself)")]
    Link { path: String, component: String },
    #[error("{path}: {component} is not a directory")]
    NotDir { path: String, component: String },
    #[error("{path} is not under {root}")]
    Outside { path: String, root: String },
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
}

/// A directory or file opened beneath a root without following any symbolic link below
/// the root, held open. [`Pinned::path`] names the opened object itself
/// (`/proc/self/fd/N`): a path swapped for a link after the open does not redirect it.
#[derive(Debug)]
pub struct Pinned {
    fd: std::os::fd::OwnedFd,
    /// The path it was opened as, for messages.
    pub shown: PathBuf,
}

impl Pinned {
    /// The opened object's own path, valid while `self` lives.
    pub fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        std::fs::metadata(self.path()).is_ok_and(|m| m.is_dir())
    }
}

fn cstr(p: &std::ffi::OsStr) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// Opens `path` (inside `root`, absolute or relative to it) beneath `root`, component by
/// component with `O_NOFOLLOW`: a symbolic link anywhere below the root is refused, and so
/// is a path that leaves it. With `create_dirs`, missing directories are made on the way
/// (and the last component is a directory). `root` itself, and what lies above it, are the
/// operator's and may be links.
// SAFETY (the unsafe blocks below): `openat`/`open`/`mkdirat` get NUL-terminated paths that
// live across the call and a directory fd the function owns; a descriptor they return is
// owned by nothing else, so `OwnedFd` takes it.
#[allow(unsafe_code)]
pub fn open_beneath(root: &Path, path: &Path, create_dirs: bool) -> Result<Pinned, BeneathError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let shown = || path.display().to_string();
    let io_err = |err: std::io::Error| BeneathError::Io { path: shown(), err };
    let rel = if path.is_absolute() {
        path.strip_prefix(root).map_err(|_| BeneathError::Outside {
            path: shown(),
            root: root.display().to_string(),
        })?
    } else {
        path
    };
    let open = |dir: Option<&OwnedFd>, name: &std::ffi::OsStr, flags: libc::c_int| {
        use std::os::fd::AsRawFd;
        let c = cstr(name)?;
        let fd = unsafe {
            match dir {
                Some(d) => libc::openat(d.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC),
                None => libc::open(c.as_ptr(), flags | libc::O_CLOEXEC),
            }
        };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    };
    let mut fd = open(None, root.as_os_str(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| {
        BeneathError::Io {
            path: root.display().to_string(),
            err: e,
        }
    })?;
    let comps: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::CurDir => None,
            _ => Some(Err(())),
        })
        .collect::<Result<_, ()>>()
        .map_err(|()| BeneathError::Outside {
            path: shown(),
            root: root.display().to_string(),
        })?;
    for (i, name) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        if create_dirs {
            use std::os::fd::AsRawFd;
            let c = cstr(name).map_err(io_err)?;
            let r = unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(io_err(e));
                }
            }
        }
        let dir_flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_DIRECTORY;
        let flags = if last && !create_dirs {
            // The last one may be a file or a directory; O_PATH-free: read-only, no link.
            libc::O_RDONLY | libc::O_NOFOLLOW
        } else {
            dir_flags
        };
        let component = || {
            comps[..=i]
                .iter()
                .map(|c| c.to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
        };
        fd = match open(Some(&fd), name, flags) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(BeneathError::Link {
                    path: shown(),
                    component: component(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                // O_DIRECTORY on a link without O_NOFOLLOW's ELOOP: tell which it is.
                let here = root.join(comps[..=i].iter().collect::<PathBuf>());
                let link = std::fs::symlink_metadata(&here).is_ok_and(|m| m.is_symlink());
                return Err(if link {
                    BeneathError::Link {
                        path: shown(),
                        component: component(),
                    }
                } else {
                    BeneathError::NotDir {
                        path: shown(),
                        component: component(),
                    }
                });
            }
            Err(e) => return Err(io_err(e)),
        };
    }
    Ok(Pinned {
        fd,
        shown: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_beneath_refuses_every_link_below_the_root_and_pins_what_it_opened() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("a/b/f"), b"inside").unwrap();
        std::fs::write(outside.join("f"), b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), root.join("a/flink")).unwrap();
        let f = open_beneath(&root, &root.join("a/b/f"), false).unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), b"inside");
        for p in ["a/link/f", "a/flink", "a/link"] {
            match open_beneath(&root, &root.join(p), false) {
                Err(BeneathError::Link { component, .. }) => {
                    assert!(p.starts_with(&component), "{p}: {component}")
                }
                other => panic!("{p}: {other:?}"),
            }
        }
        assert!(matches!(
            open_beneath(&root, &root.join("a/link/new"), true),
            Err(BeneathError::Link { .. })
        ));
        assert!(matches!(
            open_beneath(&root, &outside.join("f"), false),
            Err(BeneathError::Outside { .. })
        ));
        // Created on the way; then swapped for a link: the pinned directory stays put.
        let d = open_beneath(&root, &root.join("new/dir"), true).unwrap();
        assert!(d.is_dir());
        std::fs::rename(root.join("new"), dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("new")).unwrap();
        std::fs::write(d.path().join("x"), b"1").unwrap();
        assert!(dir.path().join("moved/dir/x").exists());
        assert!(!outside.join("dir").exists());
    }

    fn roots() -> (tempfile::TempDir, Roots) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["data", "models", "out"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let r = Roots::new(
            &dir.path().join("data"),
            &dir.path().join("models"),
            &dir.path().join("out"),
        )
        .unwrap();
        (dir, r)
    }

    #[test]
    fn relative_and_absolute_paths_inside_a_root_resolve() {
        let (dir, r) = roots();
        std::fs::write(dir.path().join("data/train.safetensors"), b"x").unwrap();
        let p = r
            .resolve(RootKind::Data, "train.safetensors", true)
            .unwrap();
        assert_eq!(p, r.data.join("train.safetensors"));
        let abs = r.data.join("train.safetensors");
        assert_eq!(
            r.resolve(RootKind::Data, abs.to_str().unwrap(), true)
                .unwrap(),
            abs
        );
        // Output directories need not exist yet.
        assert_eq!(
            r.resolve(RootKind::Outputs, "runs/a/b", false).unwrap(),
            r.outputs.join("runs/a/b")
        );
    }

    #[test]
    fn parent_components_are_refused() {
        let (_d, r) = roots();
        let e = r.resolve(RootKind::Data, "../models/x", false).unwrap_err();
        assert!(matches!(e, PathError::ParentComponent { .. }), "{e}");
        let e = r.resolve(RootKind::Data, "a/../../x", false).unwrap_err();
        assert!(matches!(e, PathError::ParentComponent { .. }), "{e}");
    }

    #[test]
    fn absolute_paths_elsewhere_are_refused() {
        let (_d, r) = roots();
        let e = r.resolve(RootKind::Data, "/etc/passwd", true).unwrap_err();
        assert!(matches!(e, PathError::OutsideRoot { .. }), "{e}");
        let models_file = r.models.join("m.pt");
        std::fs::write(&models_file, b"x").unwrap();
        // A file under another root is still outside this one.
        let e = r
            .resolve(RootKind::Data, models_file.to_str().unwrap(), true)
            .unwrap_err();
        assert!(matches!(e, PathError::OutsideRoot { .. }), "{e}");
    }

    #[test]
    fn symlinks_out_of_a_root_are_refused() {
        let (dir, r) = roots();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), r.data.join("link")).unwrap();
        let e = r.resolve(RootKind::Data, "link", true).unwrap_err();
        assert!(matches!(e, PathError::OutsideRoot { .. }), "{e}");
        std::os::unix::fs::symlink(dir.path(), r.outputs.join("escape")).unwrap();
        let e = r
            .resolve(RootKind::Outputs, "escape/new/dir", false)
            .unwrap_err();
        assert!(matches!(e, PathError::OutsideRoot { .. }), "{e}");
    }

    #[test]
    fn missing_inputs_are_reported() {
        let (_d, r) = roots();
        let e = r.resolve(RootKind::Models, "nope.pt", true).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
