//! sluice's userspace: the library behind the `sluice` binary.
//!
//! - [`dataplane`]: loads the embedded eBPF object, attaches its programs to devices (TCX where
//!   the kernel has it, clsact otherwise), and reads and writes its maps.
pub mod dataplane;
