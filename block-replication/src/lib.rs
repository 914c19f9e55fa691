//! Disk replication of a COLO pair: the primary's write forwarder, the
//! secondary's per-epoch write buffer, and the block-hash comparison that
//! makes two images equal at start-up.
