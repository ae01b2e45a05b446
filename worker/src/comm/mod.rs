//! Collectives between the ranks of a worker group, behind one trait with two transports: TCP
//! between CPU processes, and NCCL between GPUs (the `cuda` feature). Every operation has a
//! timeout, so a rank that dies or stalls becomes an error on the others, never a hang.

mod grid;
#[cfg(feature = "cuda")]
mod nccl;
pub(crate) mod tcp;

pub use grid::{Grid, Spent, SubGroup};
#[cfg(feature = "cuda")]
pub use nccl::{nccl_available, NcclCollective};
pub use tcp::{TcpCollective, TcpOptions};

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

    /// [`Collective::all_gather`] among the ranks `members` alone (ascending, this rank among
    /// them): their data in the order of `members`. Ranks outside take no part, so disjoint
    /// sub-groups (the rows and columns of a grid) run their collectives independently.
    ///
    /// This default exchanges pairwise, each rank visiting its peers in ascending order and the
    /// lower rank of a pair sending first: any order of blocking sends and receives completes.
    fn all_gather_among(&mut self, members: &[usize], data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        check_members(members, self.rank(), self.world())?;
        let me = self.rank();
        let mut out = Vec::with_capacity(members.len());
        for &peer in members {
            if peer == me {
                out.push(data.to_vec());
            } else if me < peer {
                self.send(peer, data)?;
                out.push(self.recv(peer)?);
            } else {
                let got = self.recv(peer)?;
                self.send(peer, data)?;
                out.push(got);
            }
        }
        Ok(out)
    }

    /// A communicator of `members` alone (ascending, this rank among them), whose ranks are the
    /// members' indices: every rank of the group calls this at the same point, each for the
    /// sub-group it belongs to (a grid's rows, then its columns). NCCL gives a row or column a
    /// communicator of its own, so that its collectives are single NCCL calls; `None` (the
    /// default) leaves the sub-group's collectives to this communicator (`all_gather_among`).
    fn sub_communicator(&mut self, members: &[usize]) -> Result<Option<Box<dyn Collective>>, CommError> {
        let _ = members;
        Ok(None)
    }

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
        sum_in_rank_order(&all, data)
    }

    /// Whether [`Collective::all_reduce_sum_device`] and [`Collective::all_gather_device`] take
    /// device memory on this transport (NCCL); false by default (they return `Ok(false)`).
    fn moves_device_memory(&self) -> bool {
        false
    }

    /// Sums `len` f32 at device address `addr` over the ranks, in place on the device, where
    /// the transport moves device memory (NCCL: one `ncclAllReduce` on the buffer, no copy
    /// through the host). `Ok(false)` where it does not (TCP, the default): the caller sums a
    /// host copy with [`Collective::all_reduce_sum`] instead.
    ///
    /// # Safety
    /// `addr` starts a live allocation of at least `len` f32 on the GPU the communicator was
    /// formed on (for a transport that takes device memory), and every write to it is complete.
    unsafe fn all_reduce_sum_device(&mut self, addr: u64, len: usize) -> Result<bool, CommError> {
        let _ = (addr, len);
        Ok(false)
    }

    /// Gathers every rank's `len` f32 at device address `send` into `recv` (`world · len` f32,
    /// rank after rank), on the device, where the transport moves device memory (NCCL: one
    /// `ncclAllGather`); `Ok(false)` where it does not (the default), and the caller gathers
    /// host copies with [`Collective::all_gather`].
    ///
    /// # Safety
    /// As [`Collective::all_reduce_sum_device`], for both buffers: `send` holds `len` f32, `recv`
    /// `world · len`, on the communicator's GPU, every write to them complete, not overlapping.
    unsafe fn all_gather_device(&mut self, send: u64, len: usize, recv: u64) -> Result<bool, CommError> {
        let _ = (send, len, recv);
        Ok(false)
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.all_gather(&[]).map(|_| ())
    }
}

/// `data` ← the elementwise sum of every rank's part, added in rank order.
pub(crate) fn sum_in_rank_order(all: &[Vec<f32>], data: &mut [f32]) -> Result<(), CommError> {
    data.fill(0.0);
    for (peer, part) in all.iter().enumerate() {
        if part.len() != data.len() {
            return Err(CommError::Protocol { peer, reason: "all_reduce lengths differ".into() });
        }
        for (d, p) in data.iter_mut().zip(part) {
            *d += p;
        }
    }
    Ok(())
}

/// Checks that `members` is an ascending list of ranks of a group of `world` that holds `me`.
pub(crate) fn check_members(members: &[usize], me: usize, world: usize) -> Result<(), CommError> {
    let ascending = members.windows(2).all(|w| w[0] < w[1]);
    if !ascending || members.last().is_some_and(|&r| r >= world) || !members.contains(&me) {
        return Err(CommError::Protocol {
            peer: me,
            reason: format!("sub-group {members:?} of {world} ranks must be ascending and hold rank {me}"),
        });
    }
    Ok(())
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
