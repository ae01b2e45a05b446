//! The NCCL transport (feature `cuda`): collectives between GPUs through cudarc's `nccl` module.
//! A tensor-parallel row's all-reduce runs on the engine's device buffer in place
//! ([`Collective::all_reduce_sum_device`]); other payloads come from the host and are staged
//! through device buffers; the NCCL unique id travels from rank 0 over a
//! bootstrap group (the TCP one). Every operation waits on a CUDA event with the collective
//! timeout, and so does forming the communicator: a peer that dies or stalls becomes an error,
//! and dropping the communicator aborts it.

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{Collective, CommError};

pub struct NcclCollective {
    /// Dropped by hand: cudarc's drop panics if the abort fails (a peer gone mid-operation).
    comm: ManuallyDrop<Comm>,
    stream: Arc<CudaStream>,
    timeout: Duration,
}

/// A communicator moved to the thread that forms it and back (see [`NcclCollective`]'s Send).
struct Moved<T>(T);
// SAFETY: an NCCL communicator is not tied to the thread that made it; one thread uses it at a
// time (it is handed over, never shared).
unsafe impl<T> Send for Moved<T> {}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `self.comm` is not used after.
        let comm = unsafe { ManuallyDrop::take(&mut self.comm) };
        let aborted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(comm)));
        if aborted.is_err() {
            tracing::warn!("aborting the NCCL communicator failed (its peers are gone?); going on");
        }
    }
}

// SAFETY: an NCCL communicator may move between threads; it must not be used by two at once,
// which `&mut self` on every operation rules out. cudarc binds the CUDA context to the calling
// thread before each stream operation.
unsafe impl Send for NcclCollective {}

fn setup(e: impl std::fmt::Display) -> CommError {
    CommError::Setup(e.to_string())
}

/// Whether the CUDA driver and NCCL libraries can be loaded (cudarc panics on first use otherwise).
pub fn nccl_available() -> bool {
    // SAFETY: these only try to open shared libraries by name.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// A new NCCL unique id made by `members[0]` and given to every member through `group`.
fn share_id(group: &mut dyn Collective, members: &[usize]) -> Result<[std::ffi::c_char; 128], CommError> {
    let mine: Vec<f32> = if group.rank() == members[0] {
        let id = Id::new().map_err(|e| setup(format!("ncclGetUniqueId: {e:?}")))?;
        id.internal().iter().map(|&c| c as u8 as f32).collect()
    } else {
        Vec::new()
    };
    let all = group.all_gather_among(members, &mine)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    match all.first() {
        Some(bytes) if bytes.len() == internal.len() => {
            for (dst, &b) in internal.iter_mut().zip(bytes) {
                *dst = b as u8 as std::ffi::c_char;
            }
            Ok(internal)
        }
        _ => Err(setup(format!("malformed NCCL unique id from rank {}", members[0]))),
    }
}

/// `ncclCommInitRank`, which blocks until every rank has joined and cannot be cancelled: it runs
/// on a thread of its own, so that a peer that fails after the readiness check is a timeout
/// here, not a hang (the thread is left blocked in NCCL).
fn init_comm(
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    internal: [std::ffi::c_char; 128],
    timeout: Duration,
) -> Result<Comm, CommError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("nccl-init-{rank}"))
        .spawn(move || {
            let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal)).map(Moved);
            let _ = tx.send(comm);
        })
        .map_err(setup)?;
    match rx.recv_timeout(timeout) {
        Ok(comm) => Ok(comm.map_err(|e| setup(format!("ncclCommInitRank: {e:?}")))?.0),
        Err(_) => Err(setup(format!("ncclCommInitRank: not every rank joined within {:.0} s", timeout.as_secs_f64()))),
    }
}

impl NcclCollective {
    /// Forms the NCCL communicator of the ranks of `bootstrap`, this rank on GPU `device`.
    pub fn from_bootstrap(bootstrap: &mut dyn Collective, device: usize, timeout: Duration) -> Result<Self, CommError> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world());
        // Every rank learns whether every rank can use NCCL before anyone blocks in its init.
        let ready = nccl_available();
        let all = bootstrap.all_gather(&[if ready { 1.0 } else { 0.0 }])?;
        if let Some(r) = all.iter().position(|f| f.first() != Some(&1.0)) {
            return Err(setup(format!(
                "rank {r} cannot load the CUDA driver or NCCL (libcuda.so / libnccl.so, or libnccl.so.2 \
                 which `yoco` links as libnccl.so at start-up)"
            )));
        }
        let ctx = CudaContext::new(device).map_err(|e| setup(format!("GPU {device}: {e:?}")))?;
        // One stream uses this wrapper's slices, and every operation is waited for by hand: no
        // events per slice (the flag is the wrapper's, not the CUDA context's, so the backend's
        // runtime setting it on its own does not carry over). Without this, every device buffer
        // given to a collective would make two events, and panic if that failed.
        // SAFETY: no slice of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| setup(format!("{e:?}")))?;
        let all: Vec<usize> = (0..world).collect();
        let internal = share_id(bootstrap, &all)?;
        let comm = init_comm(stream.clone(), rank, world, internal, timeout)?;
        Ok(NcclCollective { comm: ManuallyDrop::new(comm), stream, timeout })
    }

    fn driver(&self, peer: usize) -> impl Fn(cudarc::driver::DriverError) -> CommError {
        move |e| CommError::Io { peer, reason: format!("{e:?}") }
    }

    fn nccl(&self, peer: usize) -> impl Fn(cudarc::nccl::result::NcclError) -> CommError {
        move |e| CommError::Io { peer, reason: format!("{e:?}") }
    }

    /// Waits for the stream's queued work, at most the collective timeout.
    fn wait(&self, peer: usize) -> Result<(), CommError> {
        let event = self.stream.record_event(None).map_err(self.driver(peer))?;
        let started = Instant::now();
        loop {
            if event.try_is_complete().map_err(self.driver(peer))? {
                return Ok(());
            }
            if started.elapsed() > self.timeout {
                return Err(CommError::Timeout { peer, seconds: self.timeout.as_secs_f64() });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Every rank's `u64` (one each), in rank order.
    fn gather_lengths(&mut self, len: usize) -> Result<Vec<usize>, CommError> {
        let world = self.world();
        let send = self.stream.clone_htod(&[len as u64]).map_err(self.driver(0))?;
        let mut recv = self.stream.alloc_zeros::<u64>(world).map_err(self.driver(0))?;
        self.comm.all_gather(&send, &mut recv).map_err(self.nccl(0))?;
        self.wait(0)?;
        let lens = self.stream.clone_dtoh(&recv).map_err(self.driver(0))?;
        Ok(lens.into_iter().map(|l| l as usize).collect())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn send(&mut self, to: usize, data: &[f32]) -> Result<(), CommError> {
        let len = self.stream.clone_htod(&[data.len() as u64]).map_err(self.driver(to))?;
        self.comm.send(&len, to as i32).map_err(self.nccl(to))?;
        if !data.is_empty() {
            let buf = self.stream.clone_htod(data).map_err(self.driver(to))?;
            self.comm.send(&buf, to as i32).map_err(self.nccl(to))?;
        }
        self.wait(to)
    }

    fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
        let mut len = self.stream.alloc_zeros::<u64>(1).map_err(self.driver(from))?;
        self.comm.recv(&mut len, from as i32).map_err(self.nccl(from))?;
        self.wait(from)?;
        let n = self.stream.clone_dtoh(&len).map_err(self.driver(from))?[0] as usize;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = self.stream.alloc_zeros::<f32>(n).map_err(self.driver(from))?;
        self.comm.recv(&mut buf, from as i32).map_err(self.nccl(from))?;
        self.wait(from)?;
        self.stream.clone_dtoh(&buf).map_err(self.driver(from))
    }

    /// One `ncclAllReduce` (every rank gets the same bits, as NCCL's reductions give them).
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut buf = self.stream.clone_htod(data).map_err(self.driver(0))?;
        self.comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum).map_err(self.nccl(0))?;
        self.wait(0)?;
        let summed = self.stream.clone_dtoh(&buf).map_err(self.driver(0))?;
        data.copy_from_slice(&summed);
        Ok(())
    }

    fn moves_device_memory(&self) -> bool {
        true
    }

    /// One `ncclAllReduce` on the caller's device buffer, in place, on this communicator's
    /// stream (the caller's writes are complete, so no ordering between streams is needed), and
    /// waited for with the collective timeout before the buffer is used again.
    unsafe fn all_reduce_sum_device(&mut self, addr: u64, len: usize) -> Result<bool, CommError> {
        if len == 0 {
            return Ok(true);
        }
        // SAFETY: the caller guarantees a live allocation of `len` f32 on this GPU; the slice
        // is leaked below, so this never frees the caller's memory.
        let mut buf = unsafe { self.stream.upgrade_device_ptr::<f32>(addr, len) };
        let summed = self.comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum).map_err(self.nccl(0));
        buf.leak();
        summed?;
        self.wait(0)?;
        Ok(true)
    }

    /// One `ncclAllGather` from the caller's device buffer into its receive buffer.
    unsafe fn all_gather_device(&mut self, send: u64, len: usize, recv: u64) -> Result<bool, CommError> {
        if len == 0 {
            return Ok(true);
        }
        // SAFETY: the caller guarantees both allocations; the slices are leaked below, so this
        // never frees the caller's memory.
        let (from, mut to) = unsafe {
            (
                self.stream.upgrade_device_ptr::<f32>(send, len),
                self.stream.upgrade_device_ptr::<f32>(recv, len * self.world()),
            )
        };
        let gathered = self.comm.all_gather(&from, &mut to).map_err(self.nccl(0));
        from.leak();
        to.leak();
        gathered?;
        self.wait(0)?;
        Ok(true)
    }

    /// A communicator of the members alone, on this rank's GPU and stream: the leader's unique
    /// id goes to the others over this communicator, then each joins the new one.
    fn sub_communicator(&mut self, members: &[usize]) -> Result<Option<Box<dyn Collective>>, CommError> {
        super::check_members(members, self.rank(), self.world())?;
        let internal = share_id(self, members)?;
        let me = members.iter().position(|&r| r == self.rank()).expect("checked above");
        let comm = init_comm(self.stream.clone(), me, members.len(), internal, self.timeout)?;
        Ok(Some(Box::new(NcclCollective {
            comm: ManuallyDrop::new(comm),
            stream: self.stream.clone(),
            timeout: self.timeout,
        })))
    }

    fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        // NCCL gathers equal sizes: agree on the largest, pad to it, then trim each part.
        let lens = self.gather_lengths(data.len())?;
        let max = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = data.to_vec();
        padded.resize(max, 0.0);
        let send = self.stream.clone_htod(&padded).map_err(self.driver(0))?;
        let mut recv = self.stream.alloc_zeros::<f32>(max * lens.len()).map_err(self.driver(0))?;
        self.comm.all_gather(&send, &mut recv).map_err(self.nccl(0))?;
        self.wait(0)?;
        let all = self.stream.clone_dtoh(&recv).map_err(self.driver(0))?;
        Ok(all.chunks_exact(max).zip(&lens).map(|(part, &n)| part[..n].to_vec()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::tcp::tests::group;

    /// On a machine without a GPU (CI), forming an NCCL group is a clean error on every rank,
    /// never a panic or a hang; on a machine with one GPU per rank, the collectives work.
    #[test]
    fn nccl_group_forms_or_fails_cleanly() {
        let results = group(2, Duration::from_secs(20), |mut tcp| {
            let rank = tcp.rank();
            NcclCollective::from_bootstrap(&mut tcp, rank, Duration::from_secs(20)).map(|mut c| {
                let all = c.all_gather(&vec![rank as f32; rank + 1]).unwrap();
                assert_eq!(all, vec![vec![0.0], vec![1.0, 1.0]]);
            })
        });
        if nccl_available() {
            for r in results {
                // One GPU cannot host two NCCL ranks: such a machine reports a setup error.
                if let Err(e) = r {
                    assert!(matches!(e, CommError::Setup(_)), "{e}");
                }
            }
        } else {
            for r in results {
                let err = r.expect_err("no CUDA here");
                assert!(err.to_string().contains("cannot load"), "{err}");
            }
        }
    }
}
