//! The two ways into the kernel, which both end in [`crate::kernel::start`]
//! with one [`BootInfo`]:
//!
//! - `bootloader` crate (BIOS or UEFI): `_start` from `entry_point!`, already
//!   in long mode with all physical memory mapped at `PHYS_OFFSET`.
//! - Multiboot2 (GRUB): `mb2_entry32` in 32-bit protected mode with paging
//!   off (Multiboot2 spec 1.0, section 3.3 "I386 machine state"). The stub
//!   below builds page tables (identity map of the first GiB for the switch,
//!   the kernel at -2 GiB, 64 GiB of physical map at `PHYS_OFFSET`), enables
//!   PAE and long mode (Intel SDM Vol. 3A 10.8.5 "Initializing IA-32e Mode"),
//!   and calls `multiboot2_main` on a stack of its own.

use bootloader_api::config::Mapping;
use bootloader_api::info::MemoryRegionKind;
use bootloader_api::BootloaderConfig;
use hypervisor::bootinfo::{parse_multiboot2, BootInfo, BootRoute, MULTIBOOT2_BOOTLOADER_MAGIC};

use super::memory::{self, PHYS_OFFSET};

/// Kernel stack on the bootloader routes (the Multiboot2 stub has its own of
/// the same size).
pub const KERNEL_STACK: u64 = 256 * 1024;

/// How the `bootloader` crate sets the machine up for us.
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::FixedAddress(PHYS_OFFSET));
    config.kernel_stack_size = KERNEL_STACK;
    config
};

bootloader_api::entry_point!(bootloader_main, config = &BOOTLOADER_CONFIG);

fn bootloader_main(info: &'static mut bootloader_api::BootInfo) -> ! {
    // The UEFI stage reports firmware-specific region kinds; the BIOS stage
    // never does.
    let uefi = info.memory_regions.iter().any(|r| matches!(r.kind, MemoryRegionKind::UnknownUefi(_)));
    let route = if uefi { BootRoute::Uefi } else { BootRoute::Bios };
    let mut boot = BootInfo::new(route, info.physical_memory_offset.into_option().unwrap_or(PHYS_OFFSET));
    let mut top = 4 << 30;
    for region in info.memory_regions.iter() {
        top = top.max(region.end);
        if region.kind == MemoryRegionKind::Usable {
            boot.add_usable(region.start, region.end);
        }
    }
    boot.rsdp = info.rsdp_addr.into_option();
    memory::set_mapped_limit(top);
    crate::kernel::start(boot, &[])
}

core::arch::global_asm!(
    r#"
    .set KVMA, 0xffffffff80000000
    .section .multiboot2_header, "a"
    .balign 8
mb2_header_start:
    .long 0xE85250D6
    .long 0
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (0xE85250D6 + (mb2_header_end - mb2_header_start))
    .balign 8
    .short 3
    .short 0
    .long 12
    .long mb2_entry32 - KVMA
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .boot32.bss, "aw", @nobits
    .balign 4096
boot32_tables:
boot32_pml4:      .skip 4096
boot32_pdpt_low:  .skip 4096
boot32_pdpt_high: .skip 4096
boot32_pdpt_phys: .skip 4096
boot32_pd:        .skip 4096 * 64
boot32_stack:     .skip 4096
boot32_stack_top:

    .section .boot32.data, "aw"
    .balign 8
boot32_gdt:
    .quad 0
    .quad 0x00209A0000000000
    .quad 0x0000920000000000
boot32_gdtr:
    .short 23
    .long boot32_gdt - KVMA

    .section .boot32.text, "ax"
    .code32
    .global mb2_entry32
mb2_entry32:
    cli
    cld
    mov esp, offset boot32_stack_top - KVMA
    cmp eax, {magic}
    jne mb2_not_multiboot
    mov esi, ebx

    mov edi, offset boot32_tables - KVMA
    mov ecx, (4 + 64) * 1024 // dwords in the 68 table pages
    xor eax, eax
    rep stosd

    mov eax, offset boot32_pdpt_low - KVMA
    or eax, 3
    mov dword ptr [boot32_pml4 - KVMA], eax
    mov eax, offset boot32_pdpt_phys - KVMA
    or eax, 3
    mov dword ptr [boot32_pml4 - KVMA + 256 * 8], eax
    mov eax, offset boot32_pdpt_high - KVMA
    or eax, 3
    mov dword ptr [boot32_pml4 - KVMA + 511 * 8], eax
    mov eax, offset boot32_pd - KVMA
    or eax, 3
    mov dword ptr [boot32_pdpt_low - KVMA], eax
    mov dword ptr [boot32_pdpt_high - KVMA + 510 * 8], eax

    xor ecx, ecx
mb2_fill_pd:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [boot32_pd - KVMA + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov dword ptr [boot32_pd - KVMA + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 64 * 512
    jne mb2_fill_pd

    xor ecx, ecx
mb2_fill_pdpt:
    mov eax, ecx
    shl eax, 12
    add eax, offset boot32_pd - KVMA
    or eax, 3
    mov dword ptr [boot32_pdpt_phys - KVMA + ecx * 8], eax
    inc ecx
    cmp ecx, 64
    jne mb2_fill_pdpt

    mov eax, offset boot32_pml4 - KVMA
    mov cr3, eax
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | (1 << 16) | 1
    mov cr0, eax
    lgdt [boot32_gdtr - KVMA]
    mov ecx, 0x08
    push ecx
    mov eax, offset mb2_entry64 - KVMA
    push eax
    retf

mb2_not_multiboot:
    mov dx, 0x3F8
    mov al, 0x4D // 'M': not loaded by a Multiboot2 loader
    out dx, al
    hlt
    jmp mb2_not_multiboot

    .code64
mb2_entry64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    movabs rax, offset mb2_stack_top
    mov rsp, rax
    mov edi, esi
    movabs rax, offset {main}
    call rax
mb2_halt:
    hlt
    jmp mb2_halt

    .section .bss.mb2_stack, "aw", @nobits
    .balign 16
mb2_stack_bottom:
    .skip {stack}
mb2_stack_top:
"#,
    magic = const MULTIBOOT2_BOOTLOADER_MAGIC,
    main = sym multiboot2_main,
    stack = const KERNEL_STACK,
);

unsafe extern "C" {
    static __boot32_start: u8;
    static __kernel_end: u8;
}

/// The kernel is loaded at its link address minus this (see linker.ld).
const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;

extern "C" fn multiboot2_main(mbi_phys: u64) -> ! {
    memory::set_mapped_limit(memory::MULTIBOOT_MAPPED);
    let mut boot = BootInfo::new(BootRoute::Multiboot2, PHYS_OFFSET);
    let mut header = [0u8; 8];
    let parsed = memory::read_phys(mbi_phys, &mut header).then(|| {
        let total = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        // SAFETY: GRUB left a Multiboot2 information structure of `total`
        // bytes at `mbi_phys`, inside the 64 GiB the stub mapped; it is only
        // read, and the frames are reserved below before anything allocates.
        let mbi = unsafe { core::slice::from_raw_parts(memory::phys_to_virt(mbi_phys), total) };
        parse_multiboot2(mbi, &mut boot).map(|()| total as u64)
    });
    let mbi_len = match parsed {
        Some(Ok(len)) => len,
        other => {
            let _ = core::fmt::Write::write_fmt(
                &mut super::serial::RawWriter,
                format_args!("bad multiboot2 information at {mbi_phys:#x}: {other:?}\r\n"),
            );
            super::power::halt_forever()
        }
    };
    let reserved = [
        (
            core::ptr::addr_of!(__boot32_start) as u64 - KERNEL_VMA,
            core::ptr::addr_of!(__kernel_end) as u64 - KERNEL_VMA,
        ),
        (mbi_phys, mbi_phys + mbi_len),
    ];
    crate::kernel::start(boot, &reserved)
}
