//! Just enough frame parsing for the guest to notice, before smoltcp does,
//! that a frame opens a TCP connection (see `net`: a new connection's ISN
//! must not be predictable from the guest's state).

const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const PROTOCOL_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Whether `frame` (Ethernet, no VLAN tag) carries an IPv4 TCP segment with
/// SYN set and ACK clear: a peer asking to open a connection. Anything too
/// short or malformed is not one.
pub fn is_tcp_syn(frame: &[u8]) -> bool {
    if frame.get(12..14) != Some(&ETHERTYPE_IPV4[..]) {
        return false;
    }
    let Some(ip) = frame.get(ETHERNET_HEADER..) else {
        return false;
    };
    let Some(&version_ihl) = ip.first() else {
        return false;
    };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 || ip.get(9) != Some(&PROTOCOL_TCP) {
        return false;
    }
    // Only a first fragment (offset 0) holds the TCP header.
    let Some(fragment) = ip.get(6..8) else {
        return false;
    };
    if u16::from_be_bytes([fragment[0], fragment[1]]) & 0x1fff != 0 {
        return false;
    }
    match ip.get(ihl + 13) {
        Some(&flags) => flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 (IHL 5) + TCP header with the given flags.
    fn frame(flags: u8) -> std::vec::Vec<u8> {
        let mut f = std::vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4);
        f[14] = 0x45;
        f[14 + 9] = PROTOCOL_TCP;
        f[14 + 20 + 12] = 0x50;
        f[14 + 20 + 13] = flags;
        f
    }

    #[test]
    fn syn_and_nothing_else() {
        assert!(is_tcp_syn(&frame(TCP_SYN)));
        assert!(!is_tcp_syn(&frame(TCP_SYN | TCP_ACK)));
        assert!(!is_tcp_syn(&frame(TCP_ACK)));
        let mut udp = frame(TCP_SYN);
        udp[14 + 9] = 17;
        assert!(!is_tcp_syn(&udp));
        let mut arp = frame(TCP_SYN);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!is_tcp_syn(&arp));
        let mut later_fragment = frame(TCP_SYN);
        later_fragment[14 + 7] = 1;
        assert!(!is_tcp_syn(&later_fragment));
        // Options push the TCP header further.
        let mut options = frame(0);
        options[14] = 0x46;
        options.insert(14 + 20, 0);
        options.insert(14 + 20, 0);
        options.insert(14 + 20, 0);
        options.insert(14 + 20, 0);
        options[14 + 24 + 13] = TCP_SYN;
        assert!(is_tcp_syn(&options));
    }

    #[test]
    fn short_or_odd_frames_are_not_syns() {
        let full = frame(TCP_SYN);
        for len in 0..full.len() - 6 {
            assert!(!is_tcp_syn(&full[..len]), "{len} bytes");
        }
        let mut bad_ihl = full.clone();
        bad_ihl[14] = 0x41;
        assert!(!is_tcp_syn(&bad_ihl));
        let mut v6 = full;
        v6[14] = 0x65;
        assert!(!is_tcp_syn(&v6));
    }
}
