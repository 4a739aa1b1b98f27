//! The vCPU side of the hypervisor: what the processor offers (`cpu`), the
//! vendor-neutral vCPU interface (`exit`: the `Vcpu` trait and `VmExit`), and
//! the SVM control block with its exit decoding (`svm`); VMX follows.
//!
//! Everything here that can be computed from recorded values (CPUID leaves,
//! capability MSRs, exit fields) builds and is tested on the host.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod cpu;
pub mod exit;
pub mod svm;
pub mod vmcs;

pub use exit::{Access, FxImage, GuestRegs, Insn, SystemState, Vcpu, VcpuState, VmExit};
