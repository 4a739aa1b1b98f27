//! Device drivers: PCI enumeration and the e1000 NIC. Built in the
//! networking issue (#6).
#![cfg_attr(not(test), no_std)]
