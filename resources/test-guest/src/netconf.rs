//! Device and network settings from the kernel command line:
//! `virtio_mmio.device=4K@0xd0000000:5` (as the VMM writes them, the Linux
//! syntax), `ip=10.77.0.10/24`, `gw=10.77.0.1` and `dial=10.77.0.1:9000`.

use crate::cmdline::Cmdline;

/// One virtio-mmio device the VMM declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Parses `SIZE@BASE:IRQ` with SIZE like `4K`, `0x1000` or `512`.
pub fn parse_mmio_device(text: &str) -> Option<MmioDevice> {
    let (size, rest) = text.split_once('@')?;
    let (base, irq) = rest.split_once(':')?;
    let size = match size.strip_suffix(['K', 'k']) {
        Some(kib) => parse_number(kib)? * 1024,
        None => parse_number(size)?,
    };
    Some(MmioDevice {
        base: parse_number(base)?,
        size,
        irq: irq.parse().ok()?,
    })
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Every `virtio_mmio.device=` on the line, in order.
pub fn mmio_devices<'a>(cmdline: &Cmdline<'a>) -> impl Iterator<Item = MmioDevice> + 'a {
    cmdline
        .words()
        .filter(|(k, _)| *k == "virtio_mmio.device")
        .filter_map(|(_, v)| v.and_then(parse_mmio_device))
}

/// Parses `a.b.c.d`.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut out {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Parses `a.b.c.d/len` (a bare address means /24).
pub fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse().ok().filter(|&l: &u8| l <= 32)?),
        None => (s, 24),
    };
    Some((parse_ipv4(addr)?, len))
}

/// Parses `a.b.c.d:port`, a unicast address (not 0.0.0.0/8, multicast or
/// broadcast) and a port not 0, ignoring surrounding whitespace (an HTTP
/// body may end in a newline): somewhere a TCP connection can go.
pub fn parse_endpoint(s: &str) -> Option<([u8; 4], u16)> {
    let (addr, port) = s.trim().split_once(':')?;
    let port = port.parse().ok().filter(|&p: &u16| p != 0)?;
    let addr = parse_ipv4(addr)?;
    let unicast = addr[0] != 0 && addr[0] < 224;
    unicast.then_some((addr, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_vmm_device_syntax() {
        let line = Cmdline::new(
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6",
        );
        let devs: std::vec::Vec<_> = mmio_devices(&line).collect();
        assert_eq!(
            devs,
            [
                MmioDevice {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 5
                },
                MmioDevice {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 6
                },
            ]
        );
        assert_eq!(parse_mmio_device("4K@zz:5"), None);
        assert_eq!(
            parse_mmio_device("0x200@4096:7"),
            Some(MmioDevice {
                base: 4096,
                size: 512,
                irq: 7
            })
        );
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(parse_cidr("10.77.0.10/24"), Some(([10, 77, 0, 10], 24)));
        assert_eq!(parse_cidr("10.77.0.10"), Some(([10, 77, 0, 10], 24)));
        assert_eq!(parse_cidr("10.77.0.10/33"), None);
        assert_eq!(parse_ipv4("1.2.3"), None);
        assert_eq!(parse_ipv4("1.2.3.4.5"), None);
        assert_eq!(parse_ipv4("1.2.3.256"), None);
        assert_eq!(
            parse_endpoint("10.77.0.1:9000\r\n"),
            Some(([10, 77, 0, 1], 9000))
        );
        assert_eq!(parse_endpoint("10.77.0.1:0"), None);
        assert_eq!(parse_endpoint("10.77.0.1:65536"), None);
        assert_eq!(parse_endpoint("10.77.0.1"), None);
        assert_eq!(parse_endpoint("10.77.0:80"), None);
        assert_eq!(parse_endpoint(":80"), None);
        assert_eq!(parse_endpoint("10.77.0.1:80:1"), None);
        assert_eq!(parse_endpoint("0.0.0.0:80"), None);
        assert_eq!(parse_endpoint("224.0.0.1:80"), None);
        assert_eq!(parse_endpoint("255.255.255.255:80"), None);
        assert_eq!(parse_endpoint("223.1.2.3:80"), Some(([223, 1, 2, 3], 80)));
    }
}
