//! Builds the TorchScript shim against the libtorch that torch-sys found, and embeds that
//! libtorch's directory as the binary's rpath, so `ferryd` runs without LD_LIBRARY_PATH.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/train/torchscript_shim.cpp");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report libtorch's lib dir; run scripts/setup.sh (it sets LIBTORCH_USE_PYTORCH=1)"),
    );
    let torch = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let include = torch.join("include");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // Where the NCCL of the same torch wheel is looked for first (see src/gpu.rs).
    println!("cargo:rustc-env=FERRY_LIBTORCH_LIB={}", lib.display());
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("src/train/torchscript_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("ferry_torchscript_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
