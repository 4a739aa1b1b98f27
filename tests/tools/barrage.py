#!/usr/bin/env python3
"""Sends bad frames at one hypervisor host, from inside the lab namespace.

Usage: barrage.py IFACE DST_MAC DST_IP [COUNT] [KIND,KIND...]

COUNT (default 200) frames of each kind: runts, truncated IPv4, oversized
frames, bad IPv4 header checksums, bad TCP checksums, garbage EtherTypes, a
SYN flood to the bench port from random source ports, and random bytes.
Bounded in count; traffic goes only to the given host on the lab bridge.
Prints one JSON line with what was sent.
"""
import json
import os
import random
import socket
import struct
import sys


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, good: bool = True) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), random.randrange(65536), 0, 64, proto, 0, src, dst)
    c = checksum(hdr)
    if not good:
        c ^= 0x5A5A
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def tcp_syn(src: bytes, dst: bytes, sport: int, dport: int, good: bool = True) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, random.randrange(1 << 32), 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(seg))
    c = checksum(pseudo + seg)
    if not good:
        c ^= 0x1234
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def main() -> None:
    iface, dst_mac, dst_ip = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3])
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    only = set(sys.argv[5].split(",")) if len(sys.argv) > 5 else None
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src_mac = s.getsockname()[4][:6]
    src_ip = socket.inet_aton("10.77.0.1")
    eth = lambda etype: dst_mac + src_mac + struct.pack("!H", etype)
    sent = {}

    def send(kind: str, frame: bytes) -> None:
        if only is not None and kind not in only:
            return
        try:
            s.send(frame)
            sent[kind] = sent.get(kind, 0) + 1
        except OSError:
            sent[kind + "_refused_by_kernel"] = sent.get(kind + "_refused_by_kernel", 0) + 1

    for _ in range(count):
        send("runt", eth(0x0800)[: random.randrange(1, 14)])
        send("short_ipv4", eth(0x0800) + os.urandom(random.randrange(0, 19)))
        send("oversized", eth(0x0800) + ipv4(src_ip, dst_ip, 17, os.urandom(8900)))
        send("bad_ip_checksum", eth(0x0800) + ipv4(src_ip, dst_ip, 1, b"\x08\0\0\0\0\0\0\0", good=False))
        send("bad_tcp_checksum", eth(0x0800) + ipv4(src_ip, dst_ip, 6, tcp_syn(src_ip, dst_ip, 40000, 5201, good=False)))
        send("garbage_ethertype", eth(random.choice([0x1234, 0xFFFF, 0x0000, 0x88B6])) + os.urandom(64))
        send("syn_flood", eth(0x0800) + ipv4(src_ip, dst_ip, 6, tcp_syn(src_ip, dst_ip, random.randrange(1024, 65535), 5201)))
        send("random_bytes", dst_mac + os.urandom(random.randrange(1, 1500)))
    print(json.dumps(sent))


if __name__ == "__main__":
    main()
