#!/usr/bin/env python3
"""Profiles a hypervisor host running under QEMU by sampling its RIP.

Usage: guest-profile.py SOCKET ELF SECONDS [HZ]

SOCKET is the host's QEMU gdbstub (a lab host gets one at
$LAB_GDB/tapN.sock when the tests or the demo run with LAB_GDB=DIR set).
Every 1/HZ seconds (default 50) the script stops the vCPU, reads RIP and
lets it go on; then it resolves the samples with addr2line against ELF
(the kernel, target/x86_64-unknown-none/release/hypervisor) and prints
the share of samples per function, innermost (inlined) and outermost,
per source line, and, for the three hottest functions, the callers found
through the frame pointer.

Under TCG a stop takes effect between translated blocks, so time spent in
an emulated device access (an MMIO doorbell that transmits, an ICR read)
shows up at the instruction after it. Sampling slows the host down: keep
HZ low and compare shares, not absolute times.
"""
import collections
import socket
import subprocess
import sys
import time


class Gdb:
    """The few remote-protocol requests the sampler needs."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""

    def send(self, body):
        self.sock.sendall(b"$%s#%02x" % (body.encode(), sum(body.encode()) & 0xFF))

    def packet(self):
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start)
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                body, self.buf = self.buf[start + 1:end], self.buf[end + 3:]
                self.sock.sendall(b"+")
                return body.decode()
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("gdbstub closed")
            self.buf += data

    def stop(self):
        self.sock.sendall(b"\x03")
        while self.packet()[:1] not in ("T", "S"):
            pass

    def rip_and_caller(self):
        """RIP, and the return address in the frame RBP points at (the
        kernel keeps frame pointers), or 0 when it cannot be read."""
        self.send("g")  # x86-64: 16 GPRs of 8 bytes (RBP the 7th), then RIP
        regs = self.packet()
        rip = int.from_bytes(bytes.fromhex(regs[256:272]), "little")
        rbp = int.from_bytes(bytes.fromhex(regs[96:112]), "little")
        self.send("m%x,8" % (rbp + 8))
        reply = self.packet()
        caller = int.from_bytes(bytes.fromhex(reply), "little") if len(reply) == 16 else 0
        return rip, caller


def sample(path, seconds, hz):
    gdb = Gdb(path)
    gdb.send("c")
    samples, end = [], time.time() + seconds
    while time.time() < end:
        time.sleep(1.0 / hz)
        gdb.stop()
        samples.append(gdb.rip_and_caller())
        gdb.send("c")
    return samples


def symbolize(elf, rips):
    """Maps each address to its inline chain, innermost first."""
    addrs = sorted(set(rips))
    out = subprocess.run(["addr2line", "-a", "-f", "-i", "-C", "-e", elf] + ["%x" % a for a in addrs],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    chains, lines, current, i = {}, {}, None, 0
    while i < len(out):
        if out[i].startswith("0x"):
            current = int(out[i], 16)
            chains[current] = []
            i += 1
        else:
            if not chains[current]:
                lines[current] = out[i + 1].split("/")[-1] if i + 1 < len(out) else "??"
            chains[current].append(out[i].split("::<")[0])
            i += 2
    return chains, lines


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    path, elf, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    hz = float(sys.argv[4]) if len(sys.argv) == 5 else 50.0
    samples = sample(path, seconds, hz)
    rips = [r for r, _ in samples]
    chains, lines = symbolize(elf, rips + [c for _, c in samples if c])
    outer = lambda a: (chains.get(a) or ["??"])[-1]
    for title, pick in (("innermost", lambda c: c[0]), ("outermost", lambda c: c[-1])):
        counts = collections.Counter(pick(chains.get(r) or ["??"]) for r in rips)
        print(f"-- {len(rips)} samples, by {title} function")
        for name, n in counts.most_common(25):
            print(f"{100.0 * n / len(rips):5.1f}%  {name}")
    print(f"-- {len(rips)} samples, by address (disassemble with llvm-objdump --start-address)")
    for rip, n in collections.Counter(rips).most_common(10):
        print(f"{100.0 * n / len(rips):5.1f}%  {rip:#x}  {(chains.get(rip) or ['??'])[0]}")
    print(f"-- {len(rips)} samples, by innermost source line")
    for line, n in collections.Counter(lines.get(r, "??") for r in rips).most_common(15):
        print(f"{100.0 * n / len(rips):5.1f}%  {line}")
    # Who called the hottest outermost functions (memcpy is one function
    # for every copy). A sample taken before the callee saved RBP names
    # the caller's caller instead.
    for name, _ in collections.Counter(outer(r) for r in rips).most_common(3):
        callers = collections.Counter(" < ".join(chains.get(c) or ["??"]) for r, c in samples if outer(r) == name)
        print(f"-- callers of {name}")
        for caller, n in callers.most_common(8):
            print(f"{100.0 * n / len(rips):5.1f}%  {caller}")


if __name__ == "__main__":
    main()
