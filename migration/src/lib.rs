//! The live-migration wire protocol and the source/destination state
//! machines, without I/O. Built in the migration issue (#7).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
