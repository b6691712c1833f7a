//! sluice's userspace: the library behind the `sluice` binary.
//!
//! - [`dataplane`]: loads the embedded eBPF object, attaches its programs to devices (TCX where
//!   the kernel has it, clsact otherwise), and reads and writes its maps.
//! - [`service`]: frontends and backends, the types model, sync loop and dataplane share.
//! - [`model`]: Kubernetes objects in, frontends and backends out (pure).
//! - [`manifests`]: Services, EndpointSlices and Nodes read from a directory of YAML files.
//! - [`agent`]: the node agent: sources, the sync loop, metrics and health.
pub mod agent;
pub mod dataplane;
pub mod manifests;
pub mod model;
pub mod service;
