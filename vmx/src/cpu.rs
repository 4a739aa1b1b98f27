//! Processor capability report: vendor, family/model, and the virtualization
//! features that decide which backend the hypervisor uses.
//!
//! Sources: Intel SDM Vol. 2A "CPUID", Vol. 3D Appendix A "VMX capability
//! reporting facility" (IA32_VMX_* MSRs); AMD APM Vol. 3 "CPUID Fn8000_000A"
//! (SVM revision and feature identification).
//!
//! The probe takes the two privileged reads as closures, so the decoding is
//! tested on the host from recorded values.

/// IA32_VMX_BASIC: bit 55 says the TRUE_* control MSRs exist.
pub const MSR_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PROCBASED_CTLS: allowed-1 bit 31 activates the secondary controls.
pub const MSR_VMX_PROCBASED_CTLS: u32 = 0x482;
/// IA32_VMX_PROCBASED_CTLS2: allowed-1 settings of the secondary controls.
pub const MSR_VMX_PROCBASED_CTLS2: u32 = 0x48B;
/// IA32_VMX_EPT_VPID_CAP: EPT and VPID capabilities.
pub const MSR_VMX_EPT_VPID_CAP: u32 = 0x48C;

/// IA32_VMX_EPT_VPID_CAP bits (SDM Vol. 3D A.10) the EPT backend relies on:
/// the 4-level tables and write-back type its EPTP names, the 2 MiB pages
/// it maps guest memory with, the EPT A/D flags
/// that D-bit tracking and PML need, and an INVEPT to drop the translations
/// dirty tracking changes (single-context preferred, all-context else).
const EPT_WALK_LENGTH_4: u64 = 1 << 6;
const EPT_WRITE_BACK: u64 = 1 << 14;
const EPT_PAGES_2M: u64 = 1 << 16;
const EPT_INVEPT: u64 = 1 << 20;
const EPT_ACCESSED_DIRTY: u64 = 1 << 21;
const EPT_INVEPT_SINGLE: u64 = 1 << 25;
const EPT_INVEPT_ALL: u64 = 1 << 26;

/// Which hardware virtualization the processor offers, in the order the
/// hypervisor prefers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Intel VT-x with EPT.
    Vmx,
    /// AMD-V with nested paging.
    Svm,
    /// Neither (or without second-level paging): VMs cannot run.
    None,
}

impl Backend {
    /// Short lowercase name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vmx => "vmx",
            Backend::Svm => "svm",
            Backend::None => "none",
        }
    }
}

/// What the processor reports about itself and its virtualization support.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuReport {
    /// CPUID.0 vendor string, for example `AuthenticAMD`.
    pub vendor: [u8; 12],
    /// CPUID brand string (leaves 0x80000002..4), trimmed of NULs at print time.
    pub brand: [u8; 48],
    /// Display family (base family plus extended family when base is 0xF).
    pub family: u32,
    /// Display model (extended model folded in for families 6 and 0xF).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// CPUID.1:ECX.VMX.
    pub vmx: bool,
    /// CPUID.80000001:ECX.SVM.
    pub svm: bool,
    /// EPT (Intel) or NPT (AMD) second-level address translation. On Intel
    /// only EPT the backend can use: 4-level tables, write-back, 2 MiB
    /// pages, INVEPT.
    pub slat: bool,
    /// INVEPT single-context (Intel); without it the backend flushes all
    /// contexts.
    pub invept_single: bool,
    /// EPT accessed and dirty flags (Intel only).
    pub ept_ad: bool,
    /// Page-modification logging (Intel only).
    pub pml: bool,
    /// VPID (Intel) is available.
    pub vpid: bool,
    /// Number of tags the TLB can tell apart: VPIDs (Intel, 65535 when
    /// supported) or ASIDs (AMD, CPUID.8000000A:EBX), 0 when untagged.
    pub tlb_tags: u32,
    /// Unrestricted guest (Intel); AMD guests are always unrestricted.
    pub unrestricted_guest: bool,
    /// SVM revision (CPUID.8000000A:EAX[7:0]), 0 on Intel.
    pub svm_revision: u32,
    /// NRIP save (AMD): the VMCB holds the next RIP on intercepts.
    pub nrip_save: bool,
    /// IA32_VMX_BASIC[55]: the TRUE_* control MSRs are present.
    pub vmx_true_controls: bool,
}

impl Default for CpuReport {
    fn default() -> Self {
        CpuReport {
            vendor: [0; 12],
            brand: [0; 48],
            family: 0,
            model: 0,
            stepping: 0,
            vmx: false,
            svm: false,
            slat: false,
            invept_single: false,
            ept_ad: false,
            pml: false,
            vpid: false,
            tlb_tags: 0,
            unrestricted_guest: false,
            svm_revision: 0,
            nrip_save: false,
            vmx_true_controls: false,
        }
    }
}

impl CpuReport {
    /// Reads the report through `cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]`
    /// and `rdmsr(index)`. `rdmsr` is only called for the VMX capability MSRs
    /// and only when CPUID says VMX exists, so it never faults.
    pub fn probe(cpuid: impl Fn(u32, u32) -> [u32; 4], rdmsr: impl Fn(u32) -> u64) -> Self {
        let mut report = CpuReport::default();
        let leaf0 = cpuid(0, 0);
        let max_leaf = leaf0[0];
        for (i, reg) in [leaf0[1], leaf0[3], leaf0[2]].iter().enumerate() {
            report.vendor[i * 4..i * 4 + 4].copy_from_slice(&reg.to_le_bytes());
        }
        let max_ext = cpuid(0x8000_0000, 0)[0];

        if max_leaf >= 1 {
            let [eax, _, ecx, _] = cpuid(1, 0);
            let base_family = (eax >> 8) & 0xF;
            let base_model = (eax >> 4) & 0xF;
            let ext_family = (eax >> 20) & 0xFF;
            let ext_model = (eax >> 16) & 0xF;
            report.stepping = eax & 0xF;
            report.family = if base_family == 0xF { base_family + ext_family } else { base_family };
            report.model =
                if base_family == 0x6 || base_family == 0xF { (ext_model << 4) | base_model } else { base_model };
            report.vmx = ecx & (1 << 5) != 0;
        }
        if max_ext >= 0x8000_0004 {
            for (i, leaf) in (0x8000_0002..=0x8000_0004u32).enumerate() {
                for (j, reg) in cpuid(leaf, 0).iter().enumerate() {
                    let at = i * 16 + j * 4;
                    report.brand[at..at + 4].copy_from_slice(&reg.to_le_bytes());
                }
            }
        }
        if max_ext >= 0x8000_0001 {
            report.svm = cpuid(0x8000_0001, 0)[2] & (1 << 2) != 0;
        }

        if report.vmx {
            report.probe_vmx(&rdmsr);
        } else if report.svm && max_ext >= 0x8000_000A {
            let [eax, ebx, _, edx] = cpuid(0x8000_000A, 0);
            report.svm_revision = eax & 0xFF;
            report.tlb_tags = ebx;
            report.slat = edx & 1 != 0;
            report.nrip_save = edx & (1 << 3) != 0;
            report.unrestricted_guest = true;
        }
        report
    }

    fn probe_vmx(&mut self, rdmsr: &impl Fn(u32) -> u64) {
        self.vmx_true_controls = rdmsr(MSR_VMX_BASIC) & (1 << 55) != 0;
        // Allowed-1 settings are the high 32 bits of each control MSR.
        let primary_allowed1 = rdmsr(MSR_VMX_PROCBASED_CTLS) >> 32;
        if primary_allowed1 & (1 << 31) == 0 {
            return; // no secondary controls: no EPT, no VPID
        }
        let secondary_allowed1 = rdmsr(MSR_VMX_PROCBASED_CTLS2) >> 32;
        let ept = secondary_allowed1 & (1 << 1) != 0;
        self.vpid = secondary_allowed1 & (1 << 5) != 0;
        self.unrestricted_guest = secondary_allowed1 & (1 << 7) != 0;
        if self.vpid {
            self.tlb_tags = 65535;
        }
        if ept {
            let cap = rdmsr(MSR_VMX_EPT_VPID_CAP);
            let has = |bits: u64| cap & bits == bits;
            let invept = has(EPT_INVEPT) && cap & (EPT_INVEPT_SINGLE | EPT_INVEPT_ALL) != 0;
            self.slat = has(EPT_WALK_LENGTH_4 | EPT_WRITE_BACK | EPT_PAGES_2M) && invept;
            self.invept_single = self.slat && has(EPT_INVEPT_SINGLE);
            self.ept_ad = self.slat && has(EPT_ACCESSED_DIRTY);
            self.pml = self.ept_ad && secondary_allowed1 & (1 << 17) != 0;
        }
    }

    /// The backend the hypervisor will use: VMX with EPT first, then SVM with
    /// NPT, otherwise none.
    pub fn backend(&self) -> Backend {
        if self.vmx && self.slat {
            Backend::Vmx
        } else if self.svm && self.slat {
            Backend::Svm
        } else {
            Backend::None
        }
    }

    /// The vendor string as text.
    pub fn vendor_str(&self) -> &str {
        ascii_trimmed(&self.vendor)
    }

    /// The brand string as text, without padding.
    pub fn brand_str(&self) -> &str {
        ascii_trimmed(&self.brand)
    }
}

fn ascii_trimmed(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = core::str::from_utf8(&bytes[..end]).unwrap_or("?");
    text.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(s: &[u8; 12]) -> (u32, u32, u32) {
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        (w(0), w(4), w(8))
    }

    /// CPUID as QEMU 7.2 TCG `-cpu max` answers it (recorded).
    fn qemu_tcg_amd(leaf: u32, _sub: u32) -> [u32; 4] {
        let (b, d, c) = regs(b"AuthenticAMD");
        match leaf {
            0 => [0xd, b, c, d],
            1 => [0x0006_0fb1, 0, 0x8040_2001, 0x078b_fbff],
            0x8000_0000 => [0x8000_000A, 0, 0, 0],
            0x8000_0001 => [0, 0, 0x0000_0004 | 0x1, 0],
            0x8000_0002..=0x8000_0004 => [0x20202020; 4],
            0x8000_000A => [1, 16, 0, 0x1001_0001],
            _ => [0; 4],
        }
    }

    #[test]
    fn amd_with_npt_picks_svm() {
        let r = CpuReport::probe(qemu_tcg_amd, |_| panic!("no MSR reads on AMD"));
        assert_eq!(r.vendor_str(), "AuthenticAMD");
        assert_eq!((r.family, r.model, r.stepping), (0xf, 0x6b, 1));
        assert!(r.svm && r.slat && !r.vmx && !r.nrip_save);
        assert_eq!((r.svm_revision, r.tlb_tags), (1, 16));
        assert_eq!(r.backend(), Backend::Svm);
        assert_eq!(r.brand_str(), "");
    }

    #[test]
    fn extended_family_and_model_are_folded_in() {
        // Zen 2: base family 0xF + extended 0x8, extended model 0x3.
        let zen2 = |leaf, sub| if leaf == 1 { [0x0083_0f10, 0, 0, 0] } else { qemu_tcg_amd(leaf, sub) };
        let r = CpuReport::probe(zen2, |_| 0);
        assert_eq!((r.family, r.model, r.stepping), (0x17, 0x31, 0));
        // Family 6 folds the extended model in; other families do not.
        let old = |leaf, sub| if leaf == 1 { [0x0003_05a2, 0, 0, 0] } else { qemu_tcg_amd(leaf, sub) };
        assert_eq!(CpuReport::probe(old, |_| 0).model, 0xa);
    }

    fn skylake_x(leaf: u32, _sub: u32) -> [u32; 4] {
        let (b, d, c) = regs(b"GenuineIntel");
        match leaf {
            0 => [0x16, b, c, d],
            1 => [0x0005_0654, 0, 1 << 5, 0],
            0x8000_0000 => [0x8000_0008, 0, 0, 0],
            0x8000_0002 => [u32::from_le_bytes(*b"Inte"), u32::from_le_bytes(*b"l(R)"), 0, 0],
            _ => [0; 4],
        }
    }

    /// What the backend needs of Bochs 2.7's corei7 EPT capabilities:
    /// 4-level walk, WB, 2 MiB pages, INVEPT both kinds, A/D flags.
    const SKYLAKE_EPT_CAP: u64 = (1 << 6) | (1 << 14) | (1 << 16) | (1 << 20) | (1 << 21) | (1 << 25) | (1 << 26);

    fn skylake_msrs(index: u32) -> u64 {
        match index {
            MSR_VMX_BASIC => 1 << 55,
            MSR_VMX_PROCBASED_CTLS => (1u64 << 31) << 32,
            MSR_VMX_PROCBASED_CTLS2 => ((1u64 << 1) | (1 << 5) | (1 << 7) | (1 << 17)) << 32,
            MSR_VMX_EPT_VPID_CAP => SKYLAKE_EPT_CAP,
            _ => 0,
        }
    }

    #[test]
    fn intel_reports_ept_ad_pml_vpid() {
        let r = CpuReport::probe(skylake_x, skylake_msrs);
        assert_eq!(r.vendor_str(), "GenuineIntel");
        assert_eq!((r.family, r.model, r.stepping), (6, 0x55, 4));
        assert!(r.vmx && r.slat && r.ept_ad && r.pml && r.vpid && r.unrestricted_guest);
        assert!(r.vmx_true_controls && r.invept_single);
        assert_eq!(r.tlb_tags, 65535);
        assert_eq!(r.backend(), Backend::Vmx);
        assert_eq!(r.brand_str(), "Intel(R)");
    }

    #[test]
    fn vmx_without_secondary_controls_has_no_ept() {
        let r = CpuReport::probe(skylake_x, |_| 0);
        assert!(r.vmx && !r.slat && !r.vpid && !r.pml);
        assert_eq!(r.backend(), Backend::None);
    }

    #[test]
    fn pml_needs_ept_ad() {
        let r = CpuReport::probe(skylake_x, |i| match i {
            MSR_VMX_EPT_VPID_CAP => SKYLAKE_EPT_CAP & !EPT_ACCESSED_DIRTY,
            other => skylake_msrs(other),
        });
        assert!(r.slat && !r.ept_ad && !r.pml);
    }

    #[test]
    fn ept_the_backend_cannot_use_is_no_slat() {
        // Without any of these the EPTP the backend writes is invalid or
        // stale translations could not be dropped: no backend, rather than
        // a failed entry or a #UD at the first INVEPT.
        for missing in [EPT_WALK_LENGTH_4, EPT_WRITE_BACK, EPT_PAGES_2M, EPT_INVEPT, EPT_INVEPT_SINGLE | EPT_INVEPT_ALL]
        {
            let r = CpuReport::probe(skylake_x, |i| match i {
                MSR_VMX_EPT_VPID_CAP => SKYLAKE_EPT_CAP & !missing,
                other => skylake_msrs(other),
            });
            assert!(!r.slat && !r.ept_ad && !r.pml, "without {missing:#x}");
            assert_eq!(r.backend(), Backend::None, "without {missing:#x}");
        }
        // All-context INVEPT alone will do.
        let r = CpuReport::probe(skylake_x, |i| match i {
            MSR_VMX_EPT_VPID_CAP => SKYLAKE_EPT_CAP & !EPT_INVEPT_SINGLE,
            other => skylake_msrs(other),
        });
        assert!(r.slat && !r.invept_single && r.pml);
        assert_eq!(r.backend(), Backend::Vmx);
    }

    #[test]
    fn no_virtualization_reports_none() {
        let r = CpuReport::probe(
            |leaf, _| match leaf {
                0 => [1, 0, 0, 0],
                _ => [0; 4],
            },
            |_| panic!("no MSR reads"),
        );
        assert_eq!(r.backend(), Backend::None);
        assert_eq!(r.vendor_str(), "");
    }
}
