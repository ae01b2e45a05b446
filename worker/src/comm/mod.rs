//! Collectives between the ranks of a worker group, behind one trait with two transports: TCP
//! between CPU processes, and NCCL between GPUs (the `cuda` feature). Every operation has a
//! timeout, so a rank that dies or stalls becomes an error on the others, never a hang.

#[cfg(feature = "cuda")]
mod nccl;
pub(crate) mod tcp;
mod timed;

#[cfg(feature = "cuda")]
pub use nccl::{nccl_available, NcclCollective};
pub use tcp::{TcpCollective, TcpOptions};
pub use timed::Timed;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CommError {
    #[error("rank {peer} closed the connection (lost or exited)")]
    PeerLost { peer: usize },
    #[error("rank {peer} did not answer within {seconds:.1}s (collective timeout)")]
    Timeout { peer: usize, seconds: f64 },
    #[error("connection to rank {peer} failed: {reason}")]
    Io { peer: usize, reason: String },
    #[error("protocol error with rank {peer}: {reason}")]
    Protocol { peer: usize, reason: String },
    #[error("group setup failed: {0}")]
    Setup(String),
}

/// The collective operations the engine uses. Payloads are f32 because everything the ranks
/// exchange (states, halos, attention partials, flags) is.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn send(&mut self, to: usize, data: &[f32]) -> Result<(), CommError>;
    fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError>;
    /// Every rank's `data` (lengths may differ), indexed by rank.
    fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError>;

    /// Replaces `data` on every rank by the root's.
    fn broadcast(&mut self, root: usize, data: &mut Vec<f32>) -> Result<(), CommError> {
        if self.rank() == root {
            for to in (0..self.world()).filter(|&r| r != root) {
                self.send(to, data)?;
            }
        } else {
            *data = self.recv(root)?;
        }
        Ok(())
    }

    /// Elementwise sum over ranks, added in rank order so that every rank gets the same bits.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        let all = self.all_gather(data)?;
        data.fill(0.0);
        for part in &all {
            if part.len() != data.len() {
                return Err(CommError::Protocol { peer: 0, reason: "all_reduce lengths differ".into() });
            }
            for (d, p) in data.iter_mut().zip(part) {
                *d += p;
            }
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.all_gather(&[]).map(|_| ())
    }
}

/// The trivial group of one rank.
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn send(&mut self, to: usize, _: &[f32]) -> Result<(), CommError> {
        Err(CommError::Protocol { peer: to, reason: "a single rank has no peers".into() })
    }
    fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
        Err(CommError::Protocol { peer: from, reason: "a single rank has no peers".into() })
    }
    fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        Ok(vec![data.to_vec()])
    }
}
