//! The pinned toolchain pieces (see ../shared/toolchain.md for why each one). The eBPF nightly
//! itself is pinned in proxy-ebpf/rust-toolchain.toml, the userspace toolchain in
//! rust-toolchain.toml; xtask names neither.

/// bpf-linker, built against Debian's LLVM 22 (its default feature wants LLVM 23).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM's major version: bpf-linker's and the eBPF nightly's must be equal. tools.txt lists
/// `llvm-config-<this>` from `llvm-<this>-dev` (checked by a test below).
pub const LLVM_MAJOR: &str = "22";
/// The eBPF target.
pub const EBPF_TARGET: &str = "bpfel-unknown-none";

/// The eBPF crate's directory, where rustup picks the nightly from its rust-toolchain.toml.
pub fn ebpf_dir() -> std::path::PathBuf {
    crate::workspace_root().join("proxy-ebpf")
}

/// `cargo`, `rustc` or `rustup` run in the eBPF crate's directory so that rustup selects the
/// nightly pinned there: without the toolchain choice that rustup passed down to this process
/// (RUSTUP_TOOLCHAIN, which would win over the file) and without cargo's own choice of rustc.
pub fn in_ebpf_dir(argv: &[&str]) -> anyhow::Result<std::process::Command> {
    let mut cmd = testbed::cmd::command(argv)?;
    cmd.current_dir(ebpf_dir())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTUP_TOOLCHAIN_SOURCE")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use testbed::tools::{Provider, find};

    use super::*;

    #[test]
    fn tools_txt_lists_the_llvm_and_bpf_linker_that_setup_installs() {
        let llvm = find(&format!("llvm-config-{LLVM_MAJOR}"))
            .unwrap_or_else(|| panic!("tools.txt has no llvm-config-{LLVM_MAJOR}"));
        assert_eq!(
            llvm.provider,
            Provider::Apt(Box::leak(format!("llvm-{LLVM_MAJOR}-dev").into_boxed_str()))
        );
        assert_eq!(
            find("bpf-linker").map(|t| t.provider),
            Some(Provider::Cargo("bpf-linker"))
        );
    }
}
