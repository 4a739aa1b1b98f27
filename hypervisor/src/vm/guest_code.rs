//! The built-in test guest, as 64-bit code copied into every VM at
//! `guest::CODE_GPA`. Its contract (config/status page, stamps, ports) is
//! documented and host-tested in `hypervisor::guest`; the offsets below are
//! those of `guest::cfg` and `guest::st`.
//!
//! Registers: RBX = config page; R12 = TSC of the next heartbeat; R13 = TSC
//! of the next page write; R14 = now. All other state is in guest memory, so
//! a copy of the memory and these registers is a copy of the guest.
//!
//! Between heartbeats and page writes the guest stores the TSC of the next
//! one in `st::WAKE_TSC` and executes `HLT`; the hypervisor runs it again
//! then (see `guest::st::WAKE_TSC`), so an idle guest takes almost no CPU.
//!
//! With a `rate`, writes are paced by the TSC. A guest that falls more than
//! 1 ms behind (descheduled, or throttled by a migration) drops the missed
//! writes instead of catching up, as a CPU-bound workload would: taking CPU
//! time away slows its dirtying down.

core::arch::global_asm!(
    r#"
    .section .rodata.guest_image, "a"
    .balign 16
    .global guest_image_start
    .global guest_image_end
guest_image_start:
    mov rsp, {stack_top}
    mov rbx, {config}
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r12, rax
    mov r13, rax

g_main:
    cmp qword ptr [rbx + {crash_req}], 0
    jne g_crash
    cmp qword ptr [rbx + {vmsave_req}], 0
    jne g_vmsave
    cmp qword ptr [rbx + {ltr_req}], 0
    jne g_ltr
    cmp qword ptr [rbx + {trap_req}], 0
    jne g_trap
    cmp qword ptr [rbx + {regs_req}], 0
    jne g_regs
    cmp qword ptr [rbx + {dbchain_req}], 0
    jne g_dbchain
    cmp qword ptr [rbx + {insns_req}], 0
    jne g_insns
    mov rax, [rbx + {verify_req}]
    cmp rax, [rbx + {verify_done}]
    jne g_verify
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r14, rax

    cmp r14, r12
    jb g_work
    inc qword ptr [rbx + {ticks}]
    mov rax, [rbx + {tsc_hz}]
    xor edx, edx
    mov rcx, 10
    div rcx
    add r12, rax
    cmp r12, r14
    jae g_beat
    lea r12, [r14 + rax]
g_beat:
    mov eax, [rbx + {ticks}]
    out {port_heartbeat}, al

g_work:
    cmp qword ptr [rbx + {workload}], 0
    je g_idle
    mov rcx, [rbx + {rate}]
    test rcx, rcx
    jz g_write
    cmp r14, r13
    jb g_idle
    mov rax, [rbx + {tsc_hz}]
    xor edx, edx
    div rcx
    add r13, rax
    mov rax, [rbx + {tsc_hz}]
    xor edx, edx
    mov rcx, 1000
    div rcx
    mov rdx, r14
    sub rdx, rax
    jb g_write
    cmp r13, rdx
    jae g_write
    mov r13, r14
g_write:
    call g_pick
    call g_write_page
    jmp g_main
g_idle:
    mov rax, r12
    cmp qword ptr [rbx + {workload}], 0
    je g_sleep
    cmp qword ptr [rbx + {rate}], 0
    je g_sleep
    cmp r13, rax
    cmovb rax, r13
g_sleep:
    mov [rbx + {wake_tsc}], rax
    hlt
    jmp g_main

g_pick:
    mov rcx, [rbx + {data_pages}]
    cmp qword ptr [rbx + {workload}], 1
    jne g_pick_random
    mov rax, [rbx + {cursor}]
    lea rdx, [rax + 1]
    cmp rdx, rcx
    jb g_pick_store
    xor edx, edx
g_pick_store:
    mov [rbx + {cursor}], rdx
    ret
g_pick_random:
    cmp qword ptr [rbx + {workload}], 3
    jne g_pick_rng
    mov rcx, [rbx + {hot_pages}]
g_pick_rng:
    mov rax, [rbx + {rng}]
    mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    mov [rbx + {rng}], rax
    xor edx, edx
    div rcx
    mov rax, rdx
    ret

g_page_regs:
    mov r8, rsi
    shl r8, 12
    add r8, [rbx + {data_start}]
    mov r9, [rbx + {data_start}]
    shr r9, 12
    add r9, rsi
    mov rdi, [rbx + {gen_table}]
    lea rdi, [rdi + rsi * 4]
    mov eax, [rdi]
    mov r10, r9
    shl r10, 32
    xor r10, rax
    mov r11, {golden}
    ret

g_write_page:
    mov rsi, rax
    call g_page_regs
    cmp [r8], r9
    jne g_write_bad
    cmp [r8 + 8], rax
    je g_write_ok
g_write_bad:
    inc qword ptr [rbx + {check_errors}]
g_write_ok:
    inc eax
    lea rcx, [rsi + 1]
    mov [rbx + {in_flight}], rcx
    mov [rdi], eax
    mov [r8], r9
    mov [r8 + 8], rax
    mov r10, r9
    shl r10, 32
    xor r10, rax
    mov ecx, 2
g_fill:
    mov rdx, rcx
    imul rdx, r11
    xor rdx, r10
    mov [r8 + rcx * 8], rdx
    inc ecx
    cmp ecx, 512
    jne g_fill
    mov qword ptr [rbx + {in_flight}], 0
    inc qword ptr [rbx + {writes}]
    ret

g_verify:
    push qword ptr [rbx + {verify_req}]
    xor r15, r15
    mov qword ptr [rbx + {verify_first_bad}], -1
    xor esi, esi
g_verify_page:
    cmp rsi, [rbx + {data_pages}]
    jae g_verify_done
    call g_page_regs
    cmp [r8], r9
    jne g_verify_bad
    cmp [r8 + 8], rax
    jne g_verify_bad
    mov ecx, 2
g_verify_word:
    mov rdx, rcx
    imul rdx, r11
    xor rdx, r10
    cmp [r8 + rcx * 8], rdx
    jne g_verify_bad
    inc ecx
    cmp ecx, 512
    jne g_verify_word
    jmp g_verify_next
g_verify_bad:
    inc r15
    cmp qword ptr [rbx + {verify_first_bad}], -1
    jne g_verify_next
    mov [rbx + {verify_first_bad}], rsi
g_verify_next:
    inc rsi
    jmp g_verify_page
g_verify_done:
    mov [rbx + {verify_bad}], r15
    mov [rbx + {verify_pages}], rsi
    pop rax
    mov [rbx + {verify_done}], rax
    out {port_verify}, al
    jmp g_main

g_crash:
    ud2

g_vmsave:
    mov qword ptr [rbx + {vmsave_req}], 0
    xor eax, eax
    vmsave rax
    jmp g_main

g_ltr:
    call g_gdt
    mov ax, 0x28
    ltr ax
    mov qword ptr [rbx + {ltr_req}], 0
    jmp g_main

// A GDT of its own at offset 0x800 of the config page: 0x08 64-bit code
// and 0x10 data (the selectors the hypervisor starts the guest with; it
// gives the guest no GDT in memory), 0x28 a TSS at offset 0x900.
g_gdt:
    lea rdi, [rbx + 0x800]
    mov qword ptr [rdi], 0
    mov rax, 0x00AF9A000000FFFF
    mov [rdi + 8], rax
    mov rax, 0x00CF92000000FFFF
    mov [rdi + 16], rax
    mov qword ptr [rdi + 24], 0
    mov qword ptr [rdi + 32], 0
    lea rcx, [rbx + 0x900]
    mov eax, ecx
    and eax, 0xFFFF
    shl rax, 16
    or rax, 0x67
    mov rdx, rcx
    shr rdx, 16
    and edx, 0xFF
    shl rdx, 32
    or rax, rdx
    mov edx, 0x89
    shl rdx, 40
    or rax, rdx
    mov rdx, rcx
    shr rdx, 24
    and edx, 0xFF
    shl rdx, 56
    or rax, rdx
    mov [rdi + 40], rax
    mov qword ptr [rdi + 48], 0
    sub rsp, 16
    mov word ptr [rsp], 0x37
    mov [rsp + 2], rdi
    lgdt [rsp]
    add rsp, 16
    ret

// An IDT of two gates on the stack: vector 1 goes to g_trap_handler,
// through code selector 0x08 of the guest's own GDT. DR6 gets BD, which
// no #DB clears (its handler must find it with BS). Then TF for one
// instruction on the stack at TRAP_STACK (RBP keeps ours), an STI that sets
// IF: its #DB comes while the STI still blocks interrupts, and its frame
// goes on the page below TRAP_STACK. Then TF for a CPUID, which exits and
// which the hypervisor runs: its #DB must come right after it, at
// g_trap_cpuid_done (R10 keeps RBX, which CPUID overwrites).
g_trap:
    call g_gdt
    sub rsp, 64
    mov rdi, rsp
    xor edx, edx
    call g_idt_db
    mov eax, 0xFFFF2FF0
    mov dr6, rax
    mov rbp, rsp
    mov rsp, {trap_stack}
    cli
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    sti
    nop
    mov r10, rbx
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    cpuid
g_trap_cpuid_done:
    nop
    mov rbx, r10
    lea rax, [rip + g_trap_cpuid_done]
    mov [rbx + {trap_rip_wanted}], rax
    mov rsp, rbp
    mov word ptr [rsp + 32], 0
    mov qword ptr [rsp + 34], 0
    lidt [rsp + 32]
    add rsp, 64
    mov qword ptr [rbx + {trap_req}], 0
    jmp g_main

g_regs:
    movq rax, xmm0
    mov [rbx + {seen_xmm0}], rax
    mov rax, dr0
    mov [rbx + {seen_dr0}], rax
    mov rax, cr2
    mov [rbx + {seen_cr2}], rax
    mov rax, cr4
    bts rax, 16
    mov cr4, rax
    swapgs
    rdgsbase rax
    mov [rbx + {seen_kgs}], rax
    mov rax, cr8
    mov [rbx + {seen_cr8}], rax
    mov rax, [rbx + {regs_req}]
    wrgsbase rax
    swapgs
    movq xmm0, rax
    mov dr0, rax
    mov cr2, rax
    and eax, 0xF
    mov cr8, rax
    mov qword ptr [rbx + {regs_req}], 0
    jmp g_main

// The IDT at offset 0xA00 of the config page sends #DB to g_trap_handler
// on IST 1, whose stack tops at offset 0xB00 (TSS at 0x900, from g_gdt).
// DR0/DR7 arm a write breakpoint on the 8 bytes below that top, where
// delivering a #DB pushes SS: each delivery raises the next #DB before the
// handler's first instruction, for ever.
g_dbchain:
    call g_gdt
    lea rax, [rbx + 0xB00]
    mov [rbx + 0x924], rax
    mov ax, 0x28
    ltr ax
    lea rdi, [rbx + 0xA00]
    mov edx, 1
    call g_idt_db
    lea rax, [rbx + 0xAF8]
    mov dr0, rax
    mov eax, 0x90401
    mov dr7, rax
    mov qword ptr [rbx + {dbchain_req}], 0
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
    jmp g_main

// Two IDT gates at RDI, loaded into IDTR: vector 0 absent, vector 1 to
// g_trap_handler, on the IST stack DL names (0: none).
g_idt_db:
    mov qword ptr [rdi], 0
    mov qword ptr [rdi + 8], 0
    add rdi, 16
    lea rax, [rip + g_trap_handler]
    call g_gate
    sub rdi, 16
    mov ecx, 31
    jmp g_lidt

// An interrupt gate at RDI to the handler at RAX, through code selector
// 0x08 of g_gdt's GDT, on the IST stack DL names (0: none).
g_gate:
    mov [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov [rdi + 4], dl
    mov byte ptr [rdi + 5], 0x8E
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    ret

// Loads the IDT at RDI, of limit CX, into IDTR.
g_lidt:
    sub rsp, 16
    mov [rsp], cx
    mov [rsp + 2], rdi
    lidt [rsp]
    add rsp, 16
    ret

// An IDT of 14 gates on the stack: #UD (6) and #GP (13) go to
// g_insn_ud and g_insn_gp, the others are absent. Then each instruction of
// guest::INSNS, with R8 the index of its byte in INSN_FAULTS and R9 where
// a handler resumes: after the instruction.
g_insns:
    call g_gdt
    sub rsp, 224
    mov rdi, rsp
    xor eax, eax
    mov ecx, 28
    rep stosq
    xor edx, edx
    lea rdi, [rsp + 6 * 16]
    lea rax, [rip + g_insn_ud]
    call g_gate
    lea rdi, [rsp + 13 * 16]
    lea rax, [rip + g_insn_gp]
    call g_gate
    mov rdi, rsp
    mov ecx, 14 * 16 - 1
    call g_lidt
    mov qword ptr [rbx + {insn_faults}], -1
    xor r8d, r8d
    lea r9, [rip + g_insn_1]
    invd
g_insn_1:
    inc r8d
    lea r9, [rip + g_insn_2]
    wbinvd
g_insn_2:
    inc r8d
    lea r9, [rip + g_insn_3]
    xor ecx, ecx
    rdpmc
g_insn_3:
    inc r8d
    lea r9, [rip + g_insn_4]
    rdtscp
g_insn_4:
    inc r8d
    lea r9, [rip + g_insn_5]
    mov rax, rbx
    xor ecx, ecx
    xor edx, edx
    monitor
g_insn_5:
    inc r8d
    lea r9, [rip + g_insn_6]
    xor eax, eax
    xor ecx, ecx
    mwait
g_insn_6:
    inc r8d
    lea r9, [rip + g_insn_7]
    mov rax, cr4
    bts rax, 18
    mov cr4, rax
    mov eax, 1
    xor ecx, ecx
    xor edx, edx
    xsetbv
g_insn_7:
    mov rax, cr4
    btr rax, 18
    mov cr4, rax
    test qword ptr [rbx + {insns_req}], 2
    jz g_insn_8
    inc r8d
    lea r9, [rip + g_insn_8]
    bts rax, 13
    mov cr4, rax
g_insn_8:
    xor edi, edi
    xor ecx, ecx
    call g_lidt
    add rsp, 224
    mov qword ptr [rbx + {insns_req}], 0
    jmp g_main

g_insn_gp:
    add rsp, 8
    mov byte ptr [rbx + r8 + {insn_faults}], 13
    mov [rsp], r9
    iretq

g_insn_ud:
    mov byte ptr [rbx + r8 + {insn_faults}], 6
    mov [rsp], r9
    iretq

// Counts the #DB, keeps DR6 and the RIP it returns to, and returns with
// TF clear (RFLAGS is at [rsp + 16]). RAX is the hook's scratch register;
// RBX may not hold the config page (CPUID).
g_trap_handler:
    inc qword ptr [{config} + {traps}]
    mov rax, dr6
    mov [{config} + {trap_dr6}], rax
    mov rax, [rsp]
    mov [{config} + {trap_rip}], rax
    and qword ptr [rsp + 16], -0x101
    iretq
guest_image_end:
"#,
    stack_top = const hypervisor::guest::STACK_TOP,
    trap_stack = const hypervisor::guest::TRAP_STACK,
    config = const hypervisor::guest::CONFIG_GPA,
    golden = const hypervisor::guest::GOLDEN,
    port_heartbeat = const hypervisor::guest::PORT_HEARTBEAT,
    port_verify = const hypervisor::guest::PORT_VERIFY,
    data_start = const hypervisor::guest::cfg::DATA_START,
    data_pages = const hypervisor::guest::cfg::DATA_PAGES,
    gen_table = const hypervisor::guest::cfg::GEN_TABLE,
    workload = const hypervisor::guest::cfg::WORKLOAD,
    hot_pages = const hypervisor::guest::cfg::HOT_PAGES,
    rate = const hypervisor::guest::cfg::RATE,
    tsc_hz = const hypervisor::guest::cfg::TSC_HZ,
    verify_req = const hypervisor::guest::cfg::VERIFY_REQ,
    crash_req = const hypervisor::guest::cfg::CRASH_REQ,
    vmsave_req = const hypervisor::guest::cfg::VMSAVE_REQ,
    ltr_req = const hypervisor::guest::cfg::LTR_REQ,
    trap_req = const hypervisor::guest::cfg::TRAP_REQ,
    traps = const hypervisor::guest::st::TRAPS,
    trap_dr6 = const hypervisor::guest::st::TRAP_DR6,
    trap_rip = const hypervisor::guest::st::TRAP_RIP,
    trap_rip_wanted = const hypervisor::guest::st::TRAP_RIP_WANTED,
    regs_req = const hypervisor::guest::cfg::REGS_REQ,
    seen_xmm0 = const hypervisor::guest::st::SEEN_XMM0,
    seen_dr0 = const hypervisor::guest::st::SEEN_DR0,
    seen_cr2 = const hypervisor::guest::st::SEEN_CR2,
    seen_kgs = const hypervisor::guest::st::SEEN_KERNEL_GS_BASE,
    seen_cr8 = const hypervisor::guest::st::SEEN_CR8,
    dbchain_req = const hypervisor::guest::cfg::DBCHAIN_REQ,
    insns_req = const hypervisor::guest::cfg::INSNS_REQ,
    insn_faults = const hypervisor::guest::st::INSN_FAULTS,
    ticks = const hypervisor::guest::st::TICKS,
    wake_tsc = const hypervisor::guest::st::WAKE_TSC,
    writes = const hypervisor::guest::st::WRITES,
    check_errors = const hypervisor::guest::st::CHECK_ERRORS,
    in_flight = const hypervisor::guest::st::IN_FLIGHT,
    verify_done = const hypervisor::guest::st::VERIFY_DONE,
    verify_bad = const hypervisor::guest::st::VERIFY_BAD,
    verify_first_bad = const hypervisor::guest::st::VERIFY_FIRST_BAD,
    verify_pages = const hypervisor::guest::st::VERIFY_PAGES,
    cursor = const hypervisor::guest::st::CURSOR,
    rng = const hypervisor::guest::st::RNG,
);

unsafe extern "C" {
    static guest_image_start: u8;
    static guest_image_end: u8;
}

/// The guest program's bytes.
pub fn image() -> &'static [u8] {
    let start = core::ptr::addr_of!(guest_image_start);
    let end = core::ptr::addr_of!(guest_image_end);
    // SAFETY: both labels delimit the assembled guest program in .rodata,
    // `end` after `start`; the bytes are immutable for the kernel's life.
    unsafe { core::slice::from_raw_parts(start, end as usize - start as usize) }
}
