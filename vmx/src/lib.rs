//! The vCPU side of the hypervisor: what the processor offers (`cpu`), and,
//! in later issues, the VMX and SVM backends behind one `Vcpu` trait.
//!
//! Everything here that can be computed from recorded values (CPUID leaves,
//! capability MSRs, exit fields) builds and is tested on the host.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod cpu;
