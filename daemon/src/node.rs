//! What this node offers the cluster (its registration lives in [`crate::session`]).

/// Number of CUDA devices libtorch would see, without initialising CUDA in the daemon.
pub fn cuda_devices() -> u32 {
    // The daemon never touches CUDA itself (ranks do); count the device nodes instead.
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia").is_some_and(|rest| {
                        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                    })
                })
                .count() as u32
        })
        .unwrap_or(0)
}
