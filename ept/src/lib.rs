//! Second-level page tables in the Intel EPT and AMD NPT formats and the
//! dirty-page tracking built on them. Built in the AMD-V issue (#4).
#![cfg_attr(not(test), no_std)]
