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

#[cfg(test)]
mod tests {
    use super::*;

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
