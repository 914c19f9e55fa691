//! The network proxy of a COLO pair. Here: the primary's output buffer,
//! which holds the guest's frames per epoch until the checkpoint that
//! covers them is safe on the secondary (Remus mode), and the frames that
//! announce a guest's MAC after a failover. For COLO mode's compare proxy:
//! the parser that classifies a guest's frames and keys their connections,
//! and the compare proxy that releases a PVM frame once the SVM sent the
//! same output. On the secondary: the rewriter that translates the SVM's
//! TCP sequence numbers into the PVM's, and the queue that gives the SVM
//! the mirrored client frames of its epoch.

pub mod announce;
pub mod compare;
pub mod mirror;
pub mod output;
pub mod packet;
pub mod rewrite;
#[cfg(test)]
mod testing;
