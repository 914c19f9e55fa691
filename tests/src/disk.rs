//! A disk backend for tests whose reads do what the test says (panic,
//! block, ...): device-model failures injected behind a real virtio-blk.

use std::io;

use devices::virtio::BlockBackend;

/// A 1 MiB disk: every read runs `on_read` (then reads zeros); writes and
/// flushes succeed.
pub struct HookedDisk {
    on_read: Box<dyn FnMut() + Send>,
}

impl HookedDisk {
    pub fn new(on_read: impl FnMut() + Send + 'static) -> Self {
        Self {
            on_read: Box::new(on_read),
        }
    }
}

impl BlockBackend for HookedDisk {
    fn capacity(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (self.on_read)();
        buf.fill(0);
        Ok(())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn id(&self) -> &[u8] {
        b"hooked"
    }
}
