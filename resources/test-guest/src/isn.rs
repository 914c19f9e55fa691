//! Random TCP initial sequence numbers on top of smoltcp.
//!
//! smoltcp draws every ISN from one generator, seeded once from
//! `Config::random_seed`, and offers no way to reseed it. So before a
//! connection picks its ISN, the guest skips a random number of draws: it
//! opens and aborts a socket that belongs to no socket set (so nothing is
//! ever sent), each `connect` taking one draw (about a nanosecond: 65535
//! draws take some 100 000 TSC cycles in the guest, see its `random source`
//! line). Two copies of the guest that skip different numbers of draws then
//! pick different ISNs.

use smoltcp::iface::Interface;
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};

/// The socket that consumes draws.
pub struct Skipper {
    socket: tcp::Socket<'static>,
    local: Ipv4Address,
}

impl Skipper {
    /// A skipper for an interface with address `local`.
    pub fn new(local: Ipv4Address) -> Self {
        Self {
            socket: tcp::Socket::new(
                tcp::SocketBuffer::new(alloc::vec::Vec::new()),
                tcp::SocketBuffer::new(alloc::vec::Vec::new()),
            ),
            local,
        }
    }

    /// Consumes `draws` of `iface`'s ISN draws; returns how many it did
    /// (fewer only if smoltcp refused a `connect`, which it does not for
    /// these endpoints).
    pub fn skip(&mut self, iface: &mut Interface, draws: u32) -> u32 {
        // A documentation address (RFC 5737): never contacted.
        let remote = IpEndpoint::new(IpAddress::v4(192, 0, 2, 1), 9);
        let local = (IpAddress::Ipv4(self.local), 9);
        for done in 0..draws {
            if self.socket.connect(iface.context(), remote, local).is_err() {
                return done;
            }
            self.socket.abort();
        }
        draws
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::iface::{Config, SocketSet};
    use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
    use smoltcp::time::Instant;
    use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
    use std::vec::Vec;

    /// A NIC that receives nothing and keeps what is sent.
    #[derive(Default)]
    struct Wire {
        sent: Vec<Vec<u8>>,
    }

    struct Rx;
    struct Tx<'a>(&'a mut Vec<Vec<u8>>);

    impl RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&[])
        }
    }

    impl TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut frame = std::vec![0; len];
            let r = f(&mut frame);
            self.0.push(frame);
            r
        }
    }

    impl Device for Wire {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;

        fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
            None
        }

        fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
            Some(Tx(&mut self.sent))
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ethernet;
            caps.max_transmission_unit = 1514;
            caps
        }
    }

    const LOCAL: Ipv4Address = Ipv4Address::new(10, 77, 0, 10);

    fn interface(wire: &mut Wire) -> Interface {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress([
            2, 0, 0, 0, 0, 1,
        ])));
        config.random_seed = 42;
        let mut iface = Interface::new(config, wire, Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(LOCAL), 24));
        });
        iface
    }

    #[test]
    fn skips_every_draw_and_sends_nothing() {
        let mut wire = Wire::default();
        let mut iface = interface(&mut wire);
        let mut sockets = SocketSet::new(Vec::new());
        let mut skipper = Skipper::new(LOCAL);
        assert_eq!(skipper.skip(&mut iface, 1000), 1000);
        assert_eq!(skipper.skip(&mut iface, 0), 0);
        iface.poll(Instant::from_millis(1), &mut wire, &mut sockets);
        assert!(wire.sent.is_empty(), "{} frames sent", wire.sent.len());
    }
}
