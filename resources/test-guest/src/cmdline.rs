//! The kernel command line: whitespace-separated `key=value` or bare `flag`
//! words. Unknown words are ignored (a Linux-style line may carry `console=`
//! and such); when a key repeats, the last value wins.

/// A parsed view of a command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a> {
    text: &'a str,
}

impl<'a> Cmdline<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text }
    }

    /// The command line a boot loader left in `bytes` (`hdr.cmdline_size`
    /// of them): it ends at the first NUL, since some loaders count the
    /// terminator in the size and others do not; text that is not UTF-8 is
    /// cut where it stops being so.
    pub fn from_boot_bytes(bytes: &'a [u8]) -> Self {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        let text = match core::str::from_utf8(bytes) {
            Ok(text) => text,
            // The prefix up to `valid_up_to` is UTF-8 by definition.
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        };
        Self::new(text)
    }

    /// The whole line.
    pub fn as_str(&self) -> &'a str {
        self.text
    }

    /// Every word as `(key, value)`; a bare flag has value `None`.
    pub fn words(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        self.text
            .split_ascii_whitespace()
            .map(|word| match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            })
    }

    /// Value of the last `key=value`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.words()
            .filter(|(k, _)| *k == key)
            .filter_map(|(_, v)| v)
            .last()
    }

    /// Value of `key` as a number; `Err` holds the text that is not one.
    pub fn get_u64(&self, key: &str) -> Option<Result<u64, &'a str>> {
        self.get(key).map(|v| v.parse().map_err(|_| v))
    }

    /// Value of the switch `key` (its last word): a bare `key`, `key=1`,
    /// `key=on`, `key=yes` or `key=true` turn it on, `key=0`, `off`, `no` or
    /// `false` off; `Err` holds any other value.
    pub fn get_bool(&self, key: &str) -> Option<Result<bool, &'a str>> {
        let (_, value) = self.words().filter(|(k, _)| *k == key).last()?;
        Some(match value {
            None | Some("1" | "on" | "yes" | "true") => Ok(true),
            Some("0" | "off" | "no" | "false") => Ok(false),
            Some(other) => Err(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_and_flags() {
        let c = Cmdline::new("console=ttyS0  halt_after_ms=50 quiet dirty_mib_per_s=x crash=page_fault halt_after_ms=70");
        assert_eq!(c.get("console"), Some("ttyS0"));
        assert_eq!(c.get_u64("halt_after_ms"), Some(Ok(70)));
        assert_eq!(c.get_u64("dirty_mib_per_s"), Some(Err("x")));
        assert_eq!(c.get("crash"), Some("page_fault"));
        assert_eq!(c.get("quiet"), None);
        assert!(c.words().any(|w| w == ("quiet", None)));
        assert_eq!(c.get_u64("missing"), None);
        assert_eq!(Cmdline::new("").words().count(), 0);
    }

    #[test]
    fn switches() {
        let c = Cmdline::new("a b=1 c=off d=maybe e=1 e=0 f=0 f");
        assert_eq!(c.get_bool("a"), Some(Ok(true)));
        assert_eq!(c.get_bool("b"), Some(Ok(true)));
        assert_eq!(c.get_bool("c"), Some(Ok(false)));
        assert_eq!(c.get_bool("d"), Some(Err("maybe")));
        assert_eq!(c.get_bool("e"), Some(Ok(false)));
        assert_eq!(c.get_bool("f"), Some(Ok(true)));
        assert_eq!(c.get_bool("g"), None);
    }

    #[test]
    fn boot_bytes_end_at_the_first_nul() {
        // A loader that counts the NUL, one that does not, and stale bytes
        // after the terminator.
        for bytes in [
            &b"a=1 virtio_mmio.device=4K@0xd0000000:5\0"[..],
            b"a=1 virtio_mmio.device=4K@0xd0000000:5",
            b"a=1 virtio_mmio.device=4K@0xd0000000:5\0\0junk x=2",
        ] {
            let c = Cmdline::from_boot_bytes(bytes);
            assert_eq!(c.as_str(), "a=1 virtio_mmio.device=4K@0xd0000000:5");
            assert_eq!(c.get("virtio_mmio.device"), Some("4K@0xd0000000:5"));
            assert_eq!(c.get("x"), None);
        }
        assert_eq!(Cmdline::from_boot_bytes(b"").as_str(), "");
        assert_eq!(Cmdline::from_boot_bytes(b"ok \xff bad").as_str(), "ok ");
    }
}
