//! The frames that tell a segment where a guest's MAC lives now.
//!
//! After a failover the guest's frames come from the secondary's port.
//! Until a switch sees a frame from the guest's MAC there, it keeps sending
//! the guest's traffic to the dead primary's port. The new side therefore
//! broadcasts, at once and a few times after ([`ROUNDS_MS`]), a RARP
//! "request reverse" from the MAC (what QEMU's announce sends: no IP needed)
//! and, when the guest's address is known, a gratuitous ARP that also
//! refreshes neighbours' ARP caches.

use std::net::Ipv4Addr;

/// Ethernet frames shorter than this (without FCS) are padded with zeros.
pub const MIN_FRAME: usize = 60;

pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_RARP: u16 = 0x8035;

const BROADCAST: [u8; 6] = [0xff; 6];
/// ARP operation codes (RFC 826, RFC 903).
const ARP_REQUEST: u16 = 1;
const RARP_REQUEST_REVERSE: u16 = 3;

/// Delays in milliseconds, counted from the failover, at which to send the
/// announcement. The first goes at once (failover time is what a client
/// notices); the gaps then grow (50, 100, 150, 200 ms) so a switch that
/// dropped or aged out an early one still learns the port within half a
/// second, without flooding the segment. QEMU's default announce is
/// similar: 5 rounds starting 50 ms after resume, 100 ms further apart each.
pub const ROUNDS_MS: [u64; 5] = [0, 50, 150, 300, 500];

/// One round of the announcement of `mac`: the RARP frame and, when the
/// guest's address is known, the gratuitous ARP for it.
pub fn frames(mac: [u8; 6], ip: Option<Ipv4Addr>) -> Vec<Vec<u8>> {
    let mut out = vec![rarp(mac)];
    out.extend(ip.map(|ip| gratuitous_arp(mac, ip)));
    out
}

/// A RARP "request reverse" broadcast from `mac` (ethertype 0x8035, 60
/// bytes padded): sender and target hardware address `mac`, protocol
/// addresses 0.0.0.0.
pub fn rarp(mac: [u8; 6]) -> Vec<u8> {
    arp_frame(
        ETHERTYPE_RARP,
        RARP_REQUEST_REVERSE,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac,
        Ipv4Addr::UNSPECIFIED,
    )
}

/// A gratuitous ARP request for `ip` from `mac`: broadcast, sender and
/// target protocol address `ip`, target hardware address zero (RFC 5227's
/// ARP announcement).
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(ETHERTYPE_ARP, ARP_REQUEST, mac, ip, [0; 6], ip)
}

/// An Ethernet broadcast from `sha` carrying an ARP-format packet for
/// Ethernet/IPv4, padded to [`MIN_FRAME`].
fn arp_frame(
    ethertype: u16,
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f.resize(MIN_FRAME, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rarp_bytes() {
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..], // destination: broadcast
            &MAC,                                      // source
            &[0x80, 0x35],                             // ethertype RARP
            &[0x00, 0x01],                             // htype Ethernet
            &[0x08, 0x00],                             // ptype IPv4
            &[6, 4],                                   // hlen, plen
            &[0x00, 0x03],                             // op: request reverse
            &MAC, &[0, 0, 0, 0],                       // sender: MAC, 0.0.0.0
            &MAC, &[0, 0, 0, 0],                       // target: MAC, 0.0.0.0
            &[0; 18],                                  // padding to 60
        ]
        .concat();
        assert_eq!(rarp(MAC), want);
        assert_eq!(want.len(), 60);
    }

    #[test]
    fn gratuitous_arp_bytes() {
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[0xff; 6][..],                  // destination: broadcast
            &MAC,                            // source
            &[0x08, 0x06],                   // ethertype ARP
            &[0x00, 0x01, 0x08, 0x00, 6, 4], // Ethernet, IPv4, 6, 4
            &[0x00, 0x01],                   // op: request
            &MAC, &[192, 168, 10, 2],        // sender: MAC, the guest's IP
            &[0; 6], &[192, 168, 10, 2],     // target: unknown MAC, the same IP
            &[0; 18],                        // padding to 60
        ]
        .concat();
        assert_eq!(gratuitous_arp(MAC, Ipv4Addr::new(192, 168, 10, 2)), want);
    }

    #[test]
    fn a_round_has_rarp_and_arp_when_the_ip_is_known() {
        assert_eq!(frames(MAC, None), vec![rarp(MAC)]);
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(
            frames(MAC, Some(ip)),
            vec![rarp(MAC), gratuitous_arp(MAC, ip)]
        );
    }

    #[test]
    fn rounds_start_at_once_and_spread_out() {
        assert_eq!(ROUNDS_MS[0], 0);
        let gaps: Vec<u64> = ROUNDS_MS.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[0] <= g[1]), "{gaps:?}");
    }
}
