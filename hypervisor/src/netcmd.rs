//! Parsing of the network console commands (`net ...`, `ping`) and the
//! benchmark payload both ends agree on. The kernel's `net` module executes
//! the commands; everything here is tested on the host.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Default TCP port of `net bench`.
pub const BENCH_PORT: u16 = 5201;
/// MTU limits (Ethernet payload bytes).
pub const MIN_MTU: usize = 576;
/// See [`MIN_MTU`]; 9000 gives the 9014-byte frames of the reference design.
pub const MAX_MTU: usize = 9000;
/// Most pings one command sends.
pub const MAX_PING: u32 = 100;
/// Largest bench or blast transfer, MiB.
pub const MAX_MIB: u32 = 4096;

/// First port of the dynamic range (RFC 6335, 49152..=65535) that the local
/// ends of outgoing connections take.
pub const EPHEMERAL_FIRST: u16 = 49152;

/// The local port of an outgoing connection's attempt `attempt` (a refused
/// connection is tried again from the next port), spread by a clock
/// reading `seed`: always in the dynamic range, however many attempts. The
/// bench's retries once counted up past 65535 to port 0, which smoltcp
/// refuses ("connect failed").
pub fn ephemeral_port(seed: u64, attempt: u32) -> u16 {
    let span = u64::from(u16::MAX - EPHEMERAL_FIRST) + 1;
    let offset = seed.wrapping_add(u64::from(attempt)) % span;
    EPHEMERAL_FIRST + u16::try_from(offset).unwrap_or(0)
}

/// A parsed network command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetCommand {
    /// `net status`
    Status,
    /// `net ip <a.b.c.d>/<prefix>`
    Ip([u8; 4], u8),
    /// `net mtu <bytes>`
    Mtu(usize),
    /// `ping <ip> [count]`
    Ping([u8; 4], u32),
    /// `net bench listen [port]`
    BenchListen(u16),
    /// `net bench send <ip> <MiB> [port]`
    BenchSend([u8; 4], u32, u16),
    /// `net bench result`
    BenchResult,
    /// `net blast <mac> <MiB> [tcp]`: raw frames, no TCP; with `tcp`,
    /// 64 KiB TCP segments to the discard port that the NIC cuts into wire
    /// frames (`Shape::Tcp`).
    Blast([u8; 6], u32, Shape),
    /// `net blast result`
    BlastResult,
}

/// What `net blast` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// MTU-sized frames of the blast EtherType: the link's raw throughput.
    Raw,
    /// TCP segments to the discard port, cut by the NIC's segmentation
    /// offload and checked by the receiving driver, as a TCP transfer's
    /// are, but with no TCP stack at either end: what TCP over this link
    /// could reach at most.
    Tcp,
}

/// The discard service's TCP port (RFC 863). The kernel's e1000 driver
/// counts and drops segments to 0.0.0.0 on it
/// (`drivers::e1000::DISCARD_PORT`, the same number, checked at compile
/// time in the kernel).
pub const DISCARD_PORT: u16 = 9;

/// Ethernet, IPv4 and TCP headers of a [`discard_segment`].
pub const DISCARD_HEADERS: usize = 14 + 20 + 20;

/// A `len`-byte Ethernet frame (`len` taken into 54..=65549; addresses
/// left zero) holding one IPv4 TCP
/// segment from `src` to 0.0.0.0, port 9 to port 9 (discard), flags ACK,
/// sequence number 0, a zero payload: what `net blast ... tcp` sends, the
/// NIC cutting it into wire frames (so its IPv4 header checksum is left
/// 0, for the NIC to fill in each frame). The receiving driver takes it by its
/// port, not its address; 0.0.0.0 is no host's (RFC 1122), so no stack
/// would take it either.
pub fn discard_segment(src: [u8; 4], len: usize) -> Vec<u8> {
    // An IPv4 packet is at most 65535 bytes.
    let len = len.clamp(DISCARD_HEADERS, 14 + usize::from(u16::MAX));
    let mut frame = alloc::vec![0u8; len];
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&u16::try_from(len - 14).unwrap_or(u16::MAX).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&src);
    // The header checksum stays 0: the NIC sums the header of each frame
    // it cuts (segmentation zeroes the field whatever it held).
    let tcp = &mut frame[34..54];
    tcp[0..2].copy_from_slice(&DISCARD_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&DISCARD_PORT.to_be_bytes());
    tcp[12] = 5 << 4; // header length: 5 words
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&u16::MAX.to_be_bytes()); // window
    frame
}

/// Usage lines for `help`.
pub const USAGE: &[(&str, &str)] = &[
    ("net status", "MAC, IP, link, MTU and counters"),
    ("net ip <a.b.c.d>/<prefix>", "set the host's address"),
    ("net mtu <576-9000>", "set the MTU (jumbo frames above 1500)"),
    ("ping <ip> [count]", "ICMP echo with round-trip times"),
    ("net bench listen [port]", "accept bulk TCP and verify the payload"),
    ("net bench send <ip> <MiB> [port]", "send bulk TCP; prints MB/s"),
    ("net bench result", "the last transfer received"),
    ("net blast <mac> <MiB> [tcp]", "send raw frames (no TCP) for link throughput; tcp: TCP-shaped"),
    ("net blast result", "raw and TCP-shaped frames received"),
];

/// Parses a dotted IPv4 address.
pub fn parse_ipv4(s: &str) -> Result<[u8; 4], String> {
    let bad = || format!("bad IPv4 address '{s}'");
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return Err(bad());
    }
    let mut out = [0u8; 4];
    for (o, p) in out.iter_mut().zip(parts) {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        *o = p.parse().map_err(|_| bad())?;
    }
    Ok(out)
}

/// Why `ip` cannot be this host's address in a `/prefix` subnet, if it
/// cannot: smoltcp takes only unicast addresses (it panicked on a
/// multicast one), and the subnet's own and broadcast addresses name no
/// single host.
fn host_address(ip: [u8; 4], prefix: u8) -> Result<(), &'static str> {
    let addr = u32::from_be_bytes(ip);
    let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
    match ip[0] {
        0 => Err("0.x.x.x is not a host address"),
        127 => Err("loopback is not the NIC's address"),
        224..=239 => Err("a multicast address"),
        240..=255 => Err("a reserved or broadcast address"),
        // /31 and /32 have no subnet or broadcast address (RFC 3021).
        _ if prefix <= 30 && addr & host_bits == 0 => Err("the subnet's own address"),
        _ if prefix <= 30 && addr & host_bits == host_bits => Err("the subnet's broadcast address"),
        _ => Ok(()),
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("bad MAC address '{s}'");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        // Two hex digits: `from_str_radix` alone also takes "+f".
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn port(s: Option<&&str>) -> Result<u16, String> {
    match s {
        None => Ok(BENCH_PORT),
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("bad port '{p}': 1-65535")),
        },
    }
}

fn mib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_MIB).contains(&n) => Ok(n),
        _ => Err(format!("bad size '{s}': 1-{MAX_MIB} MiB")),
    }
}

/// Parses the words after `net`.
pub fn parse_net(args: &[&str]) -> Result<NetCommand, String> {
    let usage = || String::from("usage: net status|ip|mtu|bench|blast ...");
    match args {
        ["status"] => Ok(NetCommand::Status),
        ["ip", cidr] => {
            let (addr, prefix) = cidr.split_once('/').ok_or_else(|| format!("bad address '{cidr}': a.b.c.d/prefix"))?;
            let prefix = match prefix.parse::<u8>() {
                Ok(p) if (1..=32).contains(&p) => p,
                _ => return Err(format!("bad prefix '{prefix}': 1-32")),
            };
            let ip = parse_ipv4(addr)?;
            host_address(ip, prefix).map_err(|why| format!("bad address '{cidr}': {why}"))?;
            Ok(NetCommand::Ip(ip, prefix))
        }
        ["mtu", n] => match n.parse::<usize>() {
            Ok(m) if (MIN_MTU..=MAX_MTU).contains(&m) => Ok(NetCommand::Mtu(m)),
            _ => Err(format!("bad MTU '{n}': {MIN_MTU}-{MAX_MTU}")),
        },
        ["bench", "listen", rest @ ..] if rest.len() <= 1 => Ok(NetCommand::BenchListen(port(rest.first())?)),
        ["bench", "send", ip, size, rest @ ..] if rest.len() <= 1 => {
            Ok(NetCommand::BenchSend(parse_ipv4(ip)?, mib(size)?, port(rest.first())?))
        }
        ["bench", "result"] => Ok(NetCommand::BenchResult),
        ["bench", ..] => Err(String::from("usage: net bench listen [port] | send <ip> <MiB> [port] | result")),
        ["blast", "result"] => Ok(NetCommand::BlastResult),
        ["blast", mac, size] => Ok(NetCommand::Blast(parse_mac(mac)?, mib(size)?, Shape::Raw)),
        ["blast", mac, size, "tcp"] => Ok(NetCommand::Blast(parse_mac(mac)?, mib(size)?, Shape::Tcp)),
        ["blast", ..] => Err(String::from("usage: net blast <mac> <MiB> [tcp] | result")),
        _ => Err(usage()),
    }
}

/// Parses the words after `ping`.
pub fn parse_ping(args: &[&str]) -> Result<NetCommand, String> {
    match args {
        [ip] => Ok(NetCommand::Ping(parse_ipv4(ip)?, 4)),
        [ip, n] => match n.parse::<u32>() {
            Ok(c) if (1..=MAX_PING).contains(&c) => Ok(NetCommand::Ping(parse_ipv4(ip)?, c)),
            _ => Err(format!("bad count '{n}': 1-{MAX_PING}")),
        },
        _ => Err(String::from("usage: ping <ip> [count]")),
    }
}

/// Period of the benchmark payload pattern (a prime, so it never lines up
/// with segment sizes).
pub const PATTERN_PERIOD: usize = 251;

/// Byte `offset` of the benchmark payload.
pub fn pattern_byte(offset: u64) -> u8 {
    let r = u8::try_from(offset % PATTERN_PERIOD as u64).unwrap_or(0);
    r.wrapping_mul(7).wrapping_add(3)
}

/// A precomputed run of the pattern so that checking and filling are slice
/// operations: `table[o % PERIOD..][..n]` is the payload at offset `o`.
pub struct Pattern {
    table: Vec<u8>,
}

impl Pattern {
    /// A table covering chunks of up to `max_chunk` bytes.
    pub fn new(max_chunk: usize) -> Self {
        Pattern { table: (0..(max_chunk + PATTERN_PERIOD) as u64).map(pattern_byte).collect() }
    }

    /// The expected payload bytes at `offset`, `len` long (`len` at most the
    /// table's chunk size).
    pub fn slice(&self, offset: u64, len: usize) -> &[u8] {
        let start = usize::try_from(offset % PATTERN_PERIOD as u64).unwrap_or(0);
        let end = (start + len).min(self.table.len());
        &self.table[start..end]
    }

    /// Largest chunk this table serves.
    pub fn max_chunk(&self) -> usize {
        self.table.len() - PATTERN_PERIOD
    }

    /// Whether `data` is the payload at `offset` (checked in table-sized
    /// pieces).
    pub fn check(&self, offset: u64, data: &[u8]) -> bool {
        let mut at = 0;
        while at < data.len() {
            let n = (data.len() - at).min(self.max_chunk());
            if data[at..at + n] != *self.slice(offset + at as u64, n) {
                return false;
            }
            at += n;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_segments_are_whole_ipv4_tcp_segments_to_port_9() {
        use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket};
        let frame = discard_segment([10, 77, 0, 11], 64294);
        assert_eq!(frame.len(), 64294);
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(u16::from(eth.ethertype()), 0x0800);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(ip.checksum(), 0, "left to the NIC");
        assert_eq!((ip.total_len(), ip.dont_frag(), ip.src_addr().octets()), (64280, true, [10, 77, 0, 11]));
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((tcp.src_port(), tcp.dst_port(), tcp.header_len()), (DISCARD_PORT, DISCARD_PORT, 20));
        assert!(tcp.ack() && !tcp.syn() && !tcp.fin() && !tcp.rst());
        assert_eq!(tcp.payload().len(), 64294 - DISCARD_HEADERS);
        assert_eq!(discard_segment([10, 77, 0, 11], 10).len(), DISCARD_HEADERS, "never shorter than its headers");
        let longest = discard_segment([10, 77, 0, 11], 1 << 20);
        assert_eq!(
            Ipv4Packet::new_checked(&longest[14..]).unwrap().total_len(),
            u16::MAX,
            "nor longer than IPv4 allows"
        );
    }

    fn p(s: &str) -> Result<NetCommand, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.split_first() {
            Some((&"ping", rest)) => parse_ping(rest),
            Some((&"net", rest)) => parse_net(rest),
            _ => Err(String::from("?")),
        }
    }

    #[test]
    fn ephemeral_ports_stay_in_the_dynamic_range_however_many_retries() {
        for seed in [0, 15_999, 16_383, 1 << 40, u64::MAX] {
            let ports: Vec<u16> = (0..70_000).map(|a| ephemeral_port(seed, a)).collect();
            assert!(ports.iter().all(|&p| p >= EPHEMERAL_FIRST), "seed {seed}");
            // Each retry takes another port than the one before.
            assert!(ports.windows(2).all(|w| w[0] != w[1]), "seed {seed}");
        }
        assert_eq!(ephemeral_port(0, 0), 49152);
        assert_eq!(ephemeral_port(16_383, 0), 65535);
        assert_eq!(ephemeral_port(16_383, 1), 49152);
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(p("net status"), Ok(NetCommand::Status));
        assert_eq!(p("net ip 10.77.0.11/24"), Ok(NetCommand::Ip([10, 77, 0, 11], 24)));
        assert_eq!(p("net mtu 9000"), Ok(NetCommand::Mtu(9000)));
        assert_eq!(p("ping 10.77.0.1"), Ok(NetCommand::Ping([10, 77, 0, 1], 4)));
        assert_eq!(p("ping 10.77.0.1 10"), Ok(NetCommand::Ping([10, 77, 0, 1], 10)));
        assert_eq!(p("net bench listen"), Ok(NetCommand::BenchListen(BENCH_PORT)));
        assert_eq!(p("net bench listen 7000"), Ok(NetCommand::BenchListen(7000)));
        assert_eq!(p("net bench send 10.0.0.2 64"), Ok(NetCommand::BenchSend([10, 0, 0, 2], 64, BENCH_PORT)));
        assert_eq!(p("net bench result"), Ok(NetCommand::BenchResult));
        assert_eq!(
            p("net blast 52:54:00:77:00:02 8"),
            Ok(NetCommand::Blast([0x52, 0x54, 0, 0x77, 0, 2], 8, Shape::Raw))
        );
        assert_eq!(
            p("net blast 52:54:00:77:00:02 8 tcp"),
            Ok(NetCommand::Blast([0x52, 0x54, 0, 0x77, 0, 2], 8, Shape::Tcp))
        );
        assert_eq!(p("net blast result"), Ok(NetCommand::BlastResult));
    }

    #[test]
    fn refuses_bad_input_with_reasons() {
        let err = |s: &str| p(s).unwrap_err();
        assert!(err("net ip 10.0.0.1").contains("a.b.c.d/prefix"));
        assert!(err("net ip 10.0.0.256/24").contains("bad IPv4"));
        assert!(err("net ip 10.0.0/24").contains("bad IPv4"));
        assert!(err("net ip 10.0.0.1/33").contains("bad prefix"));
        assert!(err("net ip +1.0.0.1/8").contains("bad IPv4"));
        // smoltcp panics on a non-unicast address: the kernel halted.
        assert!(err("net ip 224.0.0.1/24").contains("multicast"));
        assert!(err("net ip 239.1.1.1/8").contains("multicast"));
        assert!(err("net ip 255.255.255.255/32").contains("broadcast"));
        assert!(err("net ip 0.0.0.0/8").contains("not a host address"));
        assert!(err("net ip 127.0.0.1/8").contains("loopback"));
        assert!(err("net ip 10.77.0.0/24").contains("subnet's own address"));
        assert!(err("net ip 10.77.0.255/24").contains("subnet's broadcast address"));
        assert_eq!(p("net ip 10.77.0.255/16"), Ok(NetCommand::Ip([10, 77, 0, 255], 16)));
        assert_eq!(p("net ip 10.0.0.0/31"), Ok(NetCommand::Ip([10, 0, 0, 0], 31)));
        assert_eq!(p("net ip 10.0.0.7/32"), Ok(NetCommand::Ip([10, 0, 0, 7], 32)));
        assert!(err("net mtu 100").contains("576-9000"));
        assert!(err("net mtu 9001").contains("576-9000"));
        assert!(err("ping 1.2.3.4 0").contains("bad count"));
        assert!(err("ping 1.2.3.4 1000").contains("bad count"));
        assert!(err("ping").contains("usage: ping"));
        assert!(err("net bench send 1.2.3.4 0").contains("bad size"));
        assert!(err("net bench send 1.2.3.4 8 0").contains("bad port"));
        assert!(err("net bench listen 70000").contains("bad port"));
        assert!(err("net blast 52:54:00:77:00:02 8 udp").contains("usage"));
        assert!(err("net bench fly").contains("usage: net bench"));
        assert!(err("net blast 52:54:00:77:00 8").contains("bad MAC"));
        assert!(err("net blast zz:54:00:77:00:01 8").contains("bad MAC"));
        // Was taken as 0f:..., a multicast address.
        assert!(err("net blast +f:54:00:77:00:01 8").contains("bad MAC"));
        assert!(err("net frob").contains("usage: net"));
    }

    #[test]
    fn pattern_slices_match_bytewise_pattern() {
        let pat = Pattern::new(1000);
        for offset in [0u64, 1, 250, 251, 10_000, u64::from(u32::MAX) + 7] {
            let expect: Vec<u8> = (0..700).map(|i| pattern_byte(offset + i)).collect();
            assert_eq!(pat.slice(offset, 700), &expect[..]);
            assert!(pat.check(offset, &expect));
        }
        let mut long: Vec<u8> = (0..5000).map(|i| pattern_byte(33 + i)).collect();
        assert!(pat.check(33, &long));
        long[4321] ^= 1;
        assert!(!pat.check(33, &long));
    }
}
