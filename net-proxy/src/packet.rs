//! What a guest's frame is, for the compare proxy: the parser and the
//! connection keys.
//!
//! [`parse`] reads an Ethernet II frame (no FCS) with `etherparse`:
//! up to two 802.1Q / 802.1ad (QinQ) VLAN tags, then IPv4 (options and
//! authentication header included) or IPv6 (hop-by-hop, routing,
//! destination options, fragment and authentication headers), then TCP,
//! UDP, ICMPv4 or ICMPv6. Lengths come from the headers (IPv4 total length,
//! IPv6 payload length, UDP length), so the padding of a short frame is not
//! payload. The result is a [`Packet`]:
//!
//! | class | key | compared later (issue 10's compare proxy) |
//! | --- | --- | --- |
//! | [`Packet::Tcp`] | [`FlowKey`] | payload by sequence offset within the connection, so a different segmentation or a retransmission still matches; flags, window and acknowledgement are kept for the connection's state |
//! | [`Packet::Udp`] | [`FlowKey`] | payload |
//! | [`Packet::Icmp`] | [`IcmpKey`] | bytes 5-8 of the ICMP header (echo sequence, MTU, pointer...) and payload |
//! | [`Packet::Fragment`] | [`FragmentKey`] | the whole frame |
//! | [`Packet::Other`] | ethertype | the whole frame (ARP, RARP, MACsec, more than two VLAN tags, IP protocols other than the four above) |
//!
//! IP fragments (IPv4 "more fragments" or a non-zero offset, an IPv6
//! fragment header that fragments) are recognised and not parsed further:
//! a fragment after the first has no transport header, and the first alone
//! does not hold the whole payload.
//!
//! The frame comes from a guest: any bytes at all. Nothing here panics or
//! reads out of bounds (fuzzed: `fuzz/fuzz_targets/packet.rs`); a frame
//! whose headers do not fit in it or contradict each other (an IPv4 total
//! length beyond the frame or below its header, a TCP data offset beyond
//! the segment, a UDP length below 8...) is a [`ParseError`], never a guess.

use std::net::IpAddr;

use etherparse::err::{packet::SliceError, LenError};
use etherparse::{
    Icmpv4Type, Icmpv6Type, Ipv6ExtensionSlice, Ipv6Slice, LinkExtSlice, NetSlice, SlicedPacket,
    TransportSlice,
};

/// The ethertype reported for a MACsec frame (compared whole).
pub const ETHERTYPE_MACSEC: u16 = 0x88e5;

/// A frame the parser rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A header, or the length one announces, goes beyond the frame, or a
    /// length field is below its header's size.
    #[error("bad length")]
    Length(#[source] LenError),
    /// A header's content is invalid (IP version, IPv4 header length, TCP
    /// data offset below 5, extension header order...).
    #[error("invalid frame")]
    Invalid(#[source] SliceError),
}

impl From<SliceError> for ParseError {
    fn from(e: SliceError) -> Self {
        match e {
            SliceError::Len(len) => ParseError::Length(len),
            other => ParseError::Invalid(other),
        }
    }
}

/// The VLAN tags of a frame, outermost first: none, one (802.1Q) or two
/// (QinQ). Part of every key: the same addresses on two VLANs are two
/// different hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VlanTags {
    pub outer: Option<u16>,
    pub inner: Option<u16>,
}

/// A TCP or UDP flow as one direction sees it: the 5-tuple and the VLAN
/// tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub vlan: VlanTags,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

impl FlowKey {
    /// The key of the other direction: source and destination swapped.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
            ..*self
        }
    }

    /// The key both directions of a connection share: the one whose
    /// (source, source port) is the smaller endpoint.
    pub fn canonical(&self) -> FlowKey {
        if (self.src, self.src_port) <= (self.dst, self.dst_port) {
            *self
        } else {
            self.reversed()
        }
    }

    /// Whether this direction is the canonical one (`canonical() == self`).
    pub fn is_canonical(&self) -> bool {
        self.canonical() == *self
    }
}

/// An ICMP message's key: addresses, type, code and, for echo requests and
/// replies, the identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IcmpKey {
    pub vlan: VlanTags,
    /// ICMPv4 (1) or ICMPv6 (58), as the IP header says.
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub icmp_type: u8,
    pub code: u8,
    pub identifier: Option<u16>,
}

/// The datagram an IP fragment belongs to: addresses, protocol of the
/// reassembled payload, identification (16 bits in IPv4, 32 in IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragmentKey {
    pub vlan: VlanTags,
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
}

/// TCP header flags (RFC 9293, plus NS of RFC 3540).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u16);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x001);
    pub const SYN: TcpFlags = TcpFlags(0x002);
    pub const RST: TcpFlags = TcpFlags(0x004);
    pub const PSH: TcpFlags = TcpFlags(0x008);
    pub const ACK: TcpFlags = TcpFlags(0x010);
    pub const URG: TcpFlags = TcpFlags(0x020);
    pub const ECE: TcpFlags = TcpFlags(0x040);
    pub const CWR: TcpFlags = TcpFlags(0x080);
    pub const NS: TcpFlags = TcpFlags(0x100);

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

/// A parsed frame; the slices borrow from it. See the module doc for how
/// each class is compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Tcp {
        key: FlowKey,
        seq: u32,
        ack: u32,
        flags: TcpFlags,
        window: u16,
        payload: &'a [u8],
    },
    Udp {
        key: FlowKey,
        payload: &'a [u8],
    },
    Icmp {
        key: IcmpKey,
        /// Bytes 5-8 of the ICMP header: echo identifier and sequence, the
        /// MTU of "fragmentation needed", a parameter problem's pointer...
        rest_of_header: [u8; 4],
        /// What follows the 8-byte ICMP header.
        payload: &'a [u8],
    },
    Fragment {
        key: FragmentKey,
    },
    /// Compared as the whole frame. `ethertype` is the innermost one (after
    /// the VLAN tags).
    Other {
        ethertype: u16,
    },
}

impl<'a> Packet<'a> {
    /// The bytes compared as payload (empty for fragments and others,
    /// which are compared as whole frames).
    pub fn payload(&self) -> &'a [u8] {
        match self {
            Packet::Tcp { payload, .. }
            | Packet::Udp { payload, .. }
            | Packet::Icmp { payload, .. } => payload,
            Packet::Fragment { .. } | Packet::Other { .. } => &[],
        }
    }
}

/// Parses an Ethernet II frame (without FCS). See the module doc.
pub fn parse(frame: &[u8]) -> Result<Packet<'_>, ParseError> {
    let sliced = SlicedPacket::from_ethernet(frame)?;
    let other = Packet::Other {
        ethertype: sliced
            .ether_payload()
            .map_or(0, |payload| payload.ether_type.0),
    };

    let mut vlan = VlanTags::default();
    for (i, ext) in sliced.link_exts.iter().enumerate() {
        match (i, ext) {
            (0, LinkExtSlice::Vlan(tag)) => vlan.outer = Some(tag.vlan_identifier().value()),
            (1, LinkExtSlice::Vlan(tag)) => vlan.inner = Some(tag.vlan_identifier().value()),
            (_, LinkExtSlice::Macsec(_)) => {
                return Ok(Packet::Other {
                    ethertype: ETHERTYPE_MACSEC,
                })
            }
            // A third tag: no key would tell such flows apart.
            _ => return Ok(other),
        }
    }

    let (src, dst, ip_payload, fragment_id) = match &sliced.net {
        None | Some(NetSlice::Arp(_)) => return Ok(other),
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header();
            (
                IpAddr::V4(header.source_addr()),
                IpAddr::V4(header.destination_addr()),
                ip.payload(),
                u32::from(header.identification()),
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header();
            (
                IpAddr::V6(header.source_addr()),
                IpAddr::V6(header.destination_addr()),
                ip.payload(),
                ipv6_fragment_id(ip),
            )
        }
    };
    let protocol = ip_payload.ip_number.0;

    if ip_payload.fragmented {
        return Ok(Packet::Fragment {
            key: FragmentKey {
                vlan,
                protocol,
                src,
                dst,
                id: fragment_id,
            },
        });
    }

    let flow = |src_port, dst_port| FlowKey {
        vlan,
        protocol,
        src,
        src_port,
        dst,
        dst_port,
    };
    // An echo's identifier is bytes 5-6 of its header (RFC 792, RFC 4443).
    let icmp = |icmp_type, code, echo: bool, rest_of_header: [u8; 4], payload| Packet::Icmp {
        key: IcmpKey {
            vlan,
            protocol,
            src,
            dst,
            icmp_type,
            code,
            identifier: echo.then(|| u16::from_be_bytes([rest_of_header[0], rest_of_header[1]])),
        },
        rest_of_header,
        payload,
    };
    Ok(match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => Packet::Tcp {
            key: flow(tcp.source_port(), tcp.destination_port()),
            seq: tcp.sequence_number(),
            ack: tcp.acknowledgment_number(),
            flags: tcp_flags(tcp),
            window: tcp.window_size(),
            payload: tcp.payload(),
        },
        Some(TransportSlice::Udp(udp)) => Packet::Udp {
            key: flow(udp.source_port(), udp.destination_port()),
            payload: udp.payload(),
        },
        Some(TransportSlice::Icmpv4(m)) => {
            use Icmpv4Type::{EchoReply, EchoRequest};
            let echo = matches!(m.icmp_type(), EchoRequest(_) | EchoReply(_));
            icmp(m.type_u8(), m.code_u8(), echo, m.bytes5to8(), m.payload())
        }
        Some(TransportSlice::Icmpv6(m)) => {
            use Icmpv6Type::{EchoReply, EchoRequest};
            let echo = matches!(m.icmp_type(), EchoRequest(_) | EchoReply(_));
            icmp(m.type_u8(), m.code_u8(), echo, m.bytes5to8(), m.payload())
        }
        None => other,
    })
}

/// The identification of the fragment header that fragments the payload
/// (0 if there is none: then the payload is not a fragment).
fn ipv6_fragment_id(ip: &Ipv6Slice<'_>) -> u32 {
    ip.extensions()
        .clone()
        .into_iter()
        .find_map(|ext| match ext {
            Ipv6ExtensionSlice::Fragment(f) if f.is_fragmenting_payload() => {
                Some(f.identification())
            }
            _ => None,
        })
        .unwrap_or(0)
}

fn tcp_flags(tcp: &etherparse::TcpSlice<'_>) -> TcpFlags {
    [
        (tcp.fin(), TcpFlags::FIN),
        (tcp.syn(), TcpFlags::SYN),
        (tcp.rst(), TcpFlags::RST),
        (tcp.psh(), TcpFlags::PSH),
        (tcp.ack(), TcpFlags::ACK),
        (tcp.urg(), TcpFlags::URG),
        (tcp.ece(), TcpFlags::ECE),
        (tcp.cwr(), TcpFlags::CWR),
        (tcp.ns(), TcpFlags::NS),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .fold(TcpFlags::default(), |acc, (_, flag)| acc | flag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::build;
    use etherparse::{
        ether_type, ip_number, EtherType, Ethernet2Header, IpFragOffset, IpHeaders, IpNumber,
        Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header,
        Ipv6RawExtHeader, Ipv6RoutingExtensions, PacketBuilder, PacketBuilderStep,
        SingleVlanHeader, VlanId, VlanPcp,
    };
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const V4_A: [u8; 4] = [10, 0, 0, 1];
    const V4_B: [u8; 4] = [10, 0, 0, 2];
    const V6_A: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const V6_B: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn vlan_id(id: u16) -> VlanId {
        VlanId::try_new(id).expect("vlan id")
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn v6(a: [u8; 16]) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(a))
    }

    fn flow(protocol: u8, src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> FlowKey {
        FlowKey {
            vlan: VlanTags::default(),
            protocol,
            src,
            src_port,
            dst,
            dst_port,
        }
    }

    /// Ethernet padding to the 60-byte minimum, as a NIC sends it.
    fn padded(mut frame: Vec<u8>) -> Vec<u8> {
        if frame.len() < 60 {
            frame.resize(60, 0);
        }
        frame
    }

    fn ipv4_header(protocol: IpNumber) -> Ipv4Header {
        Ipv4Header::new(0, 64, protocol, V4_A, V4_B).expect("ipv4 header")
    }

    fn ipv6_header() -> Ipv6Header {
        Ipv6Header {
            hop_limit: 64,
            source: V6_A,
            destination: V6_B,
            ..Default::default()
        }
    }

    #[test]
    fn tcp_over_ipv4() {
        let frame = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(V4_A, V4_B, 64)
                .tcp(40000, 80, 1000, 512)
                .ack(77)
                .psh(),
            b"GET / HTTP/1.0\r\n\r\n"
        );
        assert_eq!(
            parse(&frame),
            Ok(Packet::Tcp {
                key: flow(6, v4(V4_A), 40000, v4(V4_B), 80),
                seq: 1000,
                ack: 77,
                flags: TcpFlags::ACK | TcpFlags::PSH,
                window: 512,
                payload: b"GET / HTTP/1.0\r\n\r\n",
            })
        );
    }

    #[test]
    fn tcp_syn_without_payload_ignores_padding() {
        let frame = padded(build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(V4_A, V4_B, 64)
                .tcp(40000, 80, 5, 1024)
                .syn(),
            &[]
        ));
        assert_eq!(frame.len(), 60);
        let Ok(Packet::Tcp { flags, payload, .. }) = parse(&frame) else {
            panic!("not tcp: {:?}", parse(&frame));
        };
        assert_eq!(flags, TcpFlags::SYN);
        assert!(flags.contains(TcpFlags::SYN) && !flags.contains(TcpFlags::ACK));
        assert_eq!(payload, b"");
    }

    #[test]
    fn udp_with_one_vlan_tag() {
        let frame = padded(build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .single_vlan(vlan_id(42))
                .ipv4(V4_A, V4_B, 64)
                .udp(5353, 53),
            b"query"
        ));
        let mut key = flow(17, v4(V4_A), 5353, v4(V4_B), 53);
        key.vlan.outer = Some(42);
        assert_eq!(
            parse(&frame),
            Ok(Packet::Udp {
                key,
                payload: b"query"
            })
        );
    }

    #[test]
    fn udp_over_ipv6_with_two_vlan_tags() {
        let frame = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .double_vlan(vlan_id(100), vlan_id(4094))
                .ipv6(V6_A, V6_B, 64)
                .udp(1, 2),
            b"qinq"
        );
        let mut key = flow(17, v6(V6_A), 1, v6(V6_B), 2);
        key.vlan = VlanTags {
            outer: Some(100),
            inner: Some(4094),
        };
        assert_eq!(
            parse(&frame),
            Ok(Packet::Udp {
                key,
                payload: b"qinq"
            })
        );
    }

    #[test]
    fn three_vlan_tags_are_compared_whole() {
        // Two tags are all a key holds: a third is inserted by hand.
        let mut frame = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .double_vlan(vlan_id(1), vlan_id(2))
                .ipv4(V4_A, V4_B, 64)
                .udp(1, 2),
            b"x"
        );
        let third = SingleVlanHeader {
            pcp: VlanPcp::ZERO,
            drop_eligible_indicator: false,
            vlan_id: vlan_id(3),
            ether_type: ether_type::IPV4,
        };
        // The second tag's ethertype (bytes 20..22) now announces a tag.
        frame[20..22].copy_from_slice(&ether_type::VLAN_TAGGED_FRAME.0.to_be_bytes());
        frame.splice(22..22, third.to_bytes());
        assert_eq!(parse(&frame), Ok(Packet::Other { ethertype: 0x0800 }));
    }

    /// An echo request or reply between A and B.
    fn echo(ipv6: bool, icmp_type: u8, id: u16, seq: u16, payload: &[u8]) -> Packet<'_> {
        let [a, b] = id.to_be_bytes();
        let [c, d] = seq.to_be_bytes();
        let (protocol, src, dst) = if ipv6 {
            (58, v6(V6_A), v6(V6_B))
        } else {
            (1, v4(V4_A), v4(V4_B))
        };
        Packet::Icmp {
            key: IcmpKey {
                vlan: VlanTags::default(),
                protocol,
                src,
                dst,
                icmp_type,
                code: 0,
                identifier: Some(id),
            },
            rest_of_header: [a, b, c, d],
            payload,
        }
    }

    #[test]
    fn icmp_echoes_over_ipv4_and_ipv6() {
        let request = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(V4_A, V4_B, 64)
                .icmpv4_echo_request(0x1234, 7),
            b"ping data"
        );
        assert_eq!(parse(&request), Ok(echo(false, 8, 0x1234, 7, b"ping data")));
        let reply = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv6(V6_A, V6_B, 64)
                .icmpv6_echo_reply(9, 3),
            b"pong"
        );
        assert_eq!(parse(&reply), Ok(echo(true, 129, 9, 3, b"pong")));
    }

    #[test]
    fn icmpv4_error_has_no_identifier() {
        // Destination unreachable, fragmentation needed, MTU 1400.
        let frame = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(V4_A, V4_B, 64)
                .icmpv4_raw(3, 4, [0, 0, 0x05, 0x78]),
            &[0x45; 28]
        );
        let Ok(Packet::Icmp {
            key,
            rest_of_header,
            payload,
        }) = parse(&frame)
        else {
            panic!("not icmp: {:?}", parse(&frame));
        };
        assert_eq!((key.icmp_type, key.code, key.identifier), (3, 4, None));
        assert_eq!(rest_of_header, [0, 0, 0x05, 0x78]);
        assert_eq!(payload, &[0x45; 28]);
    }

    #[test]
    fn arp_rarp_and_unknown_ethertypes_are_other() {
        let mac = [2, 0, 0, 0, 0, 9];
        let arp = crate::announce::gratuitous_arp(mac, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(parse(&arp), Ok(Packet::Other { ethertype: 0x0806 }));
        let rarp = crate::announce::rarp(mac);
        assert_eq!(parse(&rarp), Ok(Packet::Other { ethertype: 0x8035 }));

        let arp_step = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .single_vlan(vlan_id(5))
            .arp(
                etherparse::ArpPacket::new(
                    etherparse::ArpHardwareId::ETHERNET,
                    ether_type::IPV4,
                    etherparse::ArpOperation::REQUEST,
                    &MAC_A,
                    &V4_A,
                    &[0; 6],
                    &V4_B,
                )
                .expect("arp packet"),
            );
        let mut arp_in_vlan = Vec::with_capacity(arp_step.size());
        arp_step.write(&mut arp_in_vlan).expect("build frame");
        assert_eq!(parse(&arp_in_vlan), Ok(Packet::Other { ethertype: 0x0806 }));

        let mut lldp = Ethernet2Header {
            source: MAC_A,
            destination: MAC_B,
            ether_type: EtherType(0x88cc),
        }
        .to_bytes()
        .to_vec();
        lldp.extend_from_slice(&[0xab; 46]);
        assert_eq!(parse(&lldp), Ok(Packet::Other { ethertype: 0x88cc }));
    }

    #[test]
    fn other_ip_protocols_are_other() {
        // GRE (47) over IPv4 and IPv6: no ports to key on.
        let gre4 = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(V4_A, V4_B, 64),
            ip_number::GRE,
            &[0; 8]
        );
        assert_eq!(parse(&gre4), Ok(Packet::Other { ethertype: 0x0800 }));
        let gre6 = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(V6_A, V6_B, 64),
            ip_number::GRE,
            &[0; 8]
        );
        assert_eq!(parse(&gre6), Ok(Packet::Other { ethertype: 0x86dd }));
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let mut header = ipv4_header(ip_number::UDP);
        // Record route with room for one address, then end of options.
        header.options = [7, 7, 4, 0, 0, 0, 0, 0].into();
        let frame = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ip(IpHeaders::Ipv4(header, Ipv4Extensions::default()))
                .udp(1000, 2000),
            b"after options"
        );
        assert_eq!(frame[14] & 0x0f, 7, "ihl counts the options");
        assert_eq!(
            parse(&frame),
            Ok(Packet::Udp {
                key: flow(17, v4(V4_A), 1000, v4(V4_B), 2000),
                payload: b"after options",
            })
        );
    }

    /// Ethernet and IPv6 with hop-by-hop, routing and fragment headers
    /// (identification 0xdeadbeef, offset 0).
    fn ipv6_with_extensions(more_fragments: bool) -> PacketBuilderStep<IpHeaders> {
        // next_header fields are set by the builder.
        let raw = |len| Ipv6RawExtHeader::new_raw(ip_number::UDP, &[0; 22][..len]).expect("ext");
        let exts = Ipv6Extensions {
            hop_by_hop_options: Some(raw(6)),
            routing: Some(Ipv6RoutingExtensions {
                routing: raw(22),
                final_destination_options: None,
            }),
            fragment: Some(Ipv6FragmentHeader::new(
                ip_number::UDP,
                IpFragOffset::ZERO,
                more_fragments,
                0xdead_beef,
            )),
            ..Default::default()
        };
        PacketBuilder::ethernet2(MAC_A, MAC_B).ip(IpHeaders::Ipv6(ipv6_header(), exts))
    }

    #[test]
    fn ipv6_extension_headers_are_skipped() {
        // An atomic fragment (offset 0, no more fragments) is whole.
        let frame = build!(ipv6_with_extensions(false).tcp(22, 50000, 9, 100), b"ssh");
        assert_eq!(frame[14 + 6], 0, "hop-by-hop first");
        assert_eq!(
            parse(&frame),
            Ok(Packet::Tcp {
                key: flow(6, v6(V6_A), 22, v6(V6_B), 50000),
                seq: 9,
                ack: 0,
                flags: TcpFlags::default(),
                window: 100,
                payload: b"ssh",
            })
        );
    }

    #[test]
    fn ipv6_fragments_are_not_parsed_further() {
        let frame = build!(ipv6_with_extensions(true).udp(1, 2), &[0xee; 64]);
        assert_eq!(
            parse(&frame),
            Ok(Packet::Fragment {
                key: FragmentKey {
                    vlan: VlanTags::default(),
                    protocol: 17,
                    src: v6(V6_A),
                    dst: v6(V6_B),
                    id: 0xdead_beef,
                }
            })
        );
    }

    #[test]
    fn ipv4_fragments_are_not_parsed_further() {
        let first = {
            let mut h = ipv4_header(ip_number::UDP);
            h.identification = 4321;
            h.more_fragments = true;
            h
        };
        let last = {
            let mut h = first.clone();
            h.more_fragments = false;
            h.fragment_offset = IpFragOffset::try_new(100).expect("offset");
            h
        };
        let expected = Ok(Packet::Fragment {
            key: FragmentKey {
                vlan: VlanTags::default(),
                protocol: 17,
                src: v4(V4_A),
                dst: v4(V4_B),
                id: 4321,
            },
        });
        let frame = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ip(IpHeaders::Ipv4(first, Ipv4Extensions::default()))
                .udp(1, 2),
            &[0xee; 64]
        );
        assert_eq!(parse(&frame), expected);
        // A later fragment: its first bytes are payload, not a UDP header.
        let frame = build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ip(IpHeaders::Ipv4(last, Ipv4Extensions::default())),
            ip_number::UDP,
            &[0xee; 3]
        );
        assert_eq!(parse(&frame), expected);
    }

    #[test]
    fn both_directions_share_the_canonical_key() {
        let key = flow(6, v4(V4_B), 80, v4(V4_A), 40000);
        assert_eq!(key.reversed().reversed(), key);
        assert_eq!(key.canonical(), key.reversed().canonical());
        assert_eq!(key.canonical(), key.reversed());
        assert!(!key.is_canonical() && key.reversed().is_canonical());
        // Same address: the ports decide.
        let local = flow(17, v4(V4_A), 9, v4(V4_A), 8);
        assert_eq!(local.canonical().src_port, 8);
        assert_eq!(local.canonical(), local.reversed().canonical());
    }

    fn udp4_frame() -> Vec<u8> {
        build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(V4_A, V4_B, 64)
                .udp(1, 2),
            &[0x5a; 40]
        )
    }

    fn tcp4_frame() -> Vec<u8> {
        build!(
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(V4_A, V4_B, 64)
                .tcp(1, 2, 3, 4),
            &[0x5a; 40]
        )
    }

    fn is_length(r: Result<Packet<'_>, ParseError>) -> bool {
        matches!(r, Err(ParseError::Length(_)))
    }

    fn is_invalid(r: Result<Packet<'_>, ParseError>) -> bool {
        matches!(r, Err(ParseError::Invalid(_)))
    }

    #[test]
    fn short_frames_are_length_errors() {
        assert!(is_length(parse(&[])));
        assert!(is_length(parse(&[0; 13])));
        let frame = udp4_frame();
        assert!(is_length(parse(&frame[..14 + 19])), "ipv4 header cut");
        assert!(is_length(parse(&frame[..14 + 20 + 7])), "udp header cut");
    }

    #[test]
    fn ipv4_total_length_must_fit_frame_and_header() {
        let mut frame = udp4_frame();
        let total = u16::from_be_bytes([frame[16], frame[17]]);
        frame[16..18].copy_from_slice(&(total + 1).to_be_bytes());
        assert!(is_length(parse(&frame)), "beyond the frame");
        frame[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert!(is_length(parse(&frame)), "below the header");
        frame[16..18].copy_from_slice(&0u16.to_be_bytes());
        assert!(parse(&frame).is_err(), "zero");
    }

    #[test]
    fn bad_ipv4_header_length_and_version_are_invalid() {
        let mut frame = udp4_frame();
        frame[14] = 0x44; // ihl 4
        assert!(is_invalid(parse(&frame)));
        frame[14] = 0x65; // version 6 under ethertype IPv4
        assert!(is_invalid(parse(&frame)));
    }

    #[test]
    fn tcp_data_offset_must_fit_the_segment() {
        let mut frame = tcp4_frame();
        let offset_byte = 14 + 20 + 12;
        frame[offset_byte] = 4 << 4; // below the 20-byte header
        assert!(is_invalid(parse(&frame)));
        // 60 bytes of header in a 60-byte segment: fits (40 bytes options).
        frame[offset_byte] = 15 << 4;
        assert!(matches!(
            parse(&frame),
            Ok(Packet::Tcp { payload: b"", .. })
        ));
        // ... but not in a 59-byte one.
        let total = u16::from_be_bytes([frame[16], frame[17]]);
        frame[16..18].copy_from_slice(&(total - 1).to_be_bytes());
        assert!(is_length(parse(&frame)));
    }

    #[test]
    fn udp_length_must_fit() {
        let mut frame = udp4_frame();
        let len_at = 14 + 20 + 4;
        frame[len_at..len_at + 2].copy_from_slice(&49u16.to_be_bytes());
        assert!(is_length(parse(&frame)), "beyond the datagram");
        frame[len_at..len_at + 2].copy_from_slice(&7u16.to_be_bytes());
        assert!(is_length(parse(&frame)), "below the header");
        frame[len_at..len_at + 2].copy_from_slice(&20u16.to_be_bytes());
        assert!(
            matches!(parse(&frame), Ok(Packet::Udp { payload, .. }) if payload == [0x5a; 12]),
            "shorter than the IP payload: the UDP length wins"
        );
    }

    /// Whether `part` lies inside `frame`.
    fn within(frame: &[u8], part: &[u8]) -> bool {
        let range = frame.as_ptr_range();
        part.is_empty() || (range.start <= part.as_ptr() && part.as_ptr_range().end <= range.end)
    }

    /// The packet without its payload, to compare a truncated parse.
    fn header_of(p: &Packet<'_>) -> Packet<'static> {
        match p.clone() {
            Packet::Tcp {
                key,
                seq,
                ack,
                flags,
                window,
                ..
            } => Packet::Tcp {
                key,
                seq,
                ack,
                flags,
                window,
                payload: &[],
            },
            Packet::Udp { key, .. } => Packet::Udp { key, payload: &[] },
            Packet::Icmp {
                key,
                rest_of_header,
                ..
            } => Packet::Icmp {
                key,
                rest_of_header,
                payload: &[],
            },
            Packet::Fragment { key } => Packet::Fragment { key },
            Packet::Other { ethertype } => Packet::Other { ethertype },
        }
    }

    /// Inputs that once made the `packet` fuzz target fail
    /// (fuzz/regressions/packet/, see fuzz/regressions/README.md).
    #[test]
    fn fuzz_regressions_stay_fixed() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/packet");
        for entry in std::fs::read_dir(dir).into_iter().flatten() {
            let frame = std::fs::read(entry.expect("dir entry").path()).expect("regression input");
            if let Ok(p) = parse(&frame) {
                assert!(within(&frame, p.payload()));
            }
        }
    }

    /// A valid frame as proptest builds it.
    #[derive(Debug, Clone)]
    struct Spec {
        vlans: Vec<u16>,
        ipv6: bool,
        transport: u8,
        src_port: u16,
        dst_port: u16,
        seq: u32,
        ack: u32,
        window: u16,
        payload: Vec<u8>,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            prop::collection::vec(0u16..4096, 0..=2),
            any::<bool>(),
            0u8..3,
            any::<(u16, u16, u32, u32, u16)>(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(
                |(vlans, ipv6, transport, (src_port, dst_port, seq, ack, window), payload)| Spec {
                    vlans,
                    ipv6,
                    transport,
                    src_port,
                    dst_port,
                    seq,
                    ack,
                    window,
                    payload,
                },
            )
    }

    /// The frame for `s` (Ethernet and VLAN headers by hand: the builder's
    /// steps have one type per VLAN form) and the packet it must parse to.
    fn frame_of(s: &Spec) -> (Vec<u8>, Packet<'_>) {
        let (ip, src, dst) = if s.ipv6 {
            let ip = IpHeaders::Ipv6(ipv6_header(), Ipv6Extensions::default());
            (ip, v6(V6_A), v6(V6_B))
        } else {
            let ip = IpHeaders::Ipv4(ipv4_header(ip_number::UDP), Ipv4Extensions::default());
            (ip, v4(V4_A), v4(V4_B))
        };
        let vlan = VlanTags {
            outer: s.vlans.first().copied(),
            inner: s.vlans.get(1).copied(),
        };
        let step = PacketBuilder::ip(ip);
        let (l3, packet) = match s.transport {
            0 => (
                build!(
                    step.tcp(s.src_port, s.dst_port, s.seq, s.window).ack(s.ack),
                    &s.payload
                ),
                Packet::Tcp {
                    key: FlowKey {
                        vlan,
                        protocol: 6,
                        src,
                        src_port: s.src_port,
                        dst,
                        dst_port: s.dst_port,
                    },
                    seq: s.seq,
                    ack: s.ack,
                    flags: TcpFlags::ACK,
                    window: s.window,
                    payload: &s.payload,
                },
            ),
            1 => (
                build!(step.udp(s.src_port, s.dst_port), &s.payload),
                Packet::Udp {
                    key: FlowKey {
                        vlan,
                        protocol: 17,
                        src,
                        src_port: s.src_port,
                        dst,
                        dst_port: s.dst_port,
                    },
                    payload: &s.payload,
                },
            ),
            _ => {
                let (l3, icmp_type, protocol) = if s.ipv6 {
                    let l3 = build!(step.icmpv6_echo_request(s.src_port, s.dst_port), &s.payload);
                    (l3, 128, 58)
                } else {
                    let l3 = build!(step.icmpv4_echo_request(s.src_port, s.dst_port), &s.payload);
                    (l3, 8, 1)
                };
                let [a, b] = s.src_port.to_be_bytes();
                let [c, d] = s.dst_port.to_be_bytes();
                (
                    l3,
                    Packet::Icmp {
                        key: IcmpKey {
                            vlan,
                            protocol,
                            src,
                            dst,
                            icmp_type,
                            code: 0,
                            identifier: Some(s.src_port),
                        },
                        rest_of_header: [a, b, c, d],
                        payload: &s.payload,
                    },
                )
            }
        };
        let ip_type = if s.ipv6 {
            ether_type::IPV6
        } else {
            ether_type::IPV4
        };
        let tpids: &[EtherType] = match s.vlans.len() {
            0 => &[],
            1 => &[ether_type::VLAN_TAGGED_FRAME],
            _ => &[ether_type::PROVIDER_BRIDGING, ether_type::VLAN_TAGGED_FRAME],
        };
        let mut frame = Ethernet2Header {
            source: MAC_A,
            destination: MAC_B,
            ether_type: tpids.first().copied().unwrap_or(ip_type),
        }
        .to_bytes()
        .to_vec();
        for (i, &id) in s.vlans.iter().enumerate() {
            let tag = SingleVlanHeader {
                pcp: VlanPcp::ZERO,
                drop_eligible_indicator: false,
                vlan_id: vlan_id(id),
                ether_type: tpids.get(i + 1).copied().unwrap_or(ip_type),
            };
            frame.extend_from_slice(&tag.to_bytes());
        }
        frame.extend_from_slice(&l3);
        (padded(frame), packet)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(frame in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = parse(&frame) {
                prop_assert!(within(&frame, p.payload()));
            }
        }

        #[test]
        fn corrupted_valid_frames_never_panic(
            s in spec(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let (mut frame, _) = frame_of(&s);
            for (at, byte) in edits {
                let i = at.index(frame.len());
                frame[i] = byte;
            }
            if let Ok(p) = parse(&frame) {
                prop_assert!(within(&frame, p.payload()));
            }
        }

        #[test]
        fn built_packets_parse_back(s in spec()) {
            let (frame, expected) = frame_of(&s);
            prop_assert_eq!(parse(&frame), Ok(expected));
        }

        #[test]
        fn truncated_frames_fail_or_parse_consistently(s in spec()) {
            let (frame, _) = frame_of(&s);
            let full = parse(&frame).expect("valid frame");
            for len in 0..frame.len() {
                if let Ok(p) = parse(&frame[..len]) {
                    prop_assert_eq!(header_of(&p), header_of(&full), "cut at {}", len);
                    prop_assert!(full.payload().starts_with(p.payload()), "cut at {}", len);
                }
            }
        }
    }
}
