//! A worker group as a `tp × cp` grid. Rank `r` sits at tensor-parallel index `r % tp` and
//! context-parallel index `r / tp`: the `tp` ranks of one cp index (a row) hold the same tokens
//! and split the weights; the `cp` ranks of one tp index (a column) hold the same weights and
//! split the tokens. Each collective runs on the whole group, a row, or a column, and the time
//! spent in each is counted (waiting for peers included).

use std::time::{Duration, Instant};

use super::{Collective, CommError};

/// Time spent in collectives, by the sub-group they ran on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    /// Within a row: the all-reduces of tensor parallelism, the gathered logits.
    pub tp: Duration,
    /// Within a column: retention states, window halos, attention partials, gathered rows.
    pub cp: Duration,
    /// The whole group: agreeing on a step, broadcasting tokens.
    pub all: Duration,
}

impl Spent {
    pub fn total(&self) -> Duration {
        self.tp + self.cp + self.all
    }
}

pub struct Grid {
    inner: Box<dyn Collective>,
    tp: usize,
    row: Vec<usize>,
    column: Vec<usize>,
    everyone: Vec<usize>,
    /// The row's and the column's communicators of their own, where the transport makes them
    /// (`Collective::sub_communicator`), with their ranks `0..n`.
    row_comm: Option<(Box<dyn Collective>, Vec<usize>)>,
    column_comm: Option<(Box<dyn Collective>, Vec<usize>)>,
    spent: Spent,
    /// Whether every rank agreed to run collectives on device buffers
    /// ([`Grid::agree_device_collectives`]).
    device: bool,
}

#[derive(Clone, Copy)]
enum Axis {
    Tp,
    Cp,
    All,
}

impl Grid {
    /// The group of `comm` as a grid of `tp` ranks per row; `tp` must divide the group's size.
    pub fn new(comm: Box<dyn Collective>, tp: usize) -> Result<Self, CommError> {
        let (rank, world) = (comm.rank(), comm.world());
        if tp == 0 || !world.is_multiple_of(tp) {
            return Err(CommError::Setup(format!("tensor-parallel size {tp} does not divide the {world} ranks")));
        }
        let (t, c) = (rank % tp, rank / tp);
        let mut comm = comm;
        let row: Vec<usize> = (0..tp).map(|j| c * tp + j).collect();
        let column: Vec<usize> = (0..world / tp).map(|j| j * tp + t).collect();
        // Every rank forms its row's communicator, then its column's: the same order everywhere.
        let mut own = |members: &[usize]| -> Result<_, CommError> {
            if members.len() < 2 || members.len() == world {
                return Ok(None);
            }
            Ok(comm.sub_communicator(members)?.map(|sub| (sub, (0..members.len()).collect())))
        };
        let (row_comm, column_comm) = (own(&row)?, own(&column)?);
        Ok(Grid {
            inner: comm,
            tp,
            row,
            column,
            everyone: (0..world).collect(),
            row_comm,
            column_comm,
            spent: Spent::default(),
            device: false,
        })
    }

    /// A grid of one rank.
    pub fn single() -> Self {
        Self::new(Box::new(super::SingleRank), 1).expect("1 divides 1")
    }

    pub fn rank(&self) -> usize {
        self.inner.rank()
    }
    pub fn world(&self) -> usize {
        self.everyone.len()
    }
    /// Ranks per row: the tensor-parallel size.
    pub fn tp_size(&self) -> usize {
        self.tp
    }
    pub fn tp_rank(&self) -> usize {
        self.rank() % self.tp
    }
    /// Ranks per column: the context-parallel size.
    pub fn cp_size(&self) -> usize {
        self.column.len()
    }
    pub fn cp_rank(&self) -> usize {
        self.rank() / self.tp
    }

    /// This rank's row (same tokens, other weight shards) as a group of its own.
    pub fn tp(&mut self) -> SubGroup<'_> {
        self.sub(Axis::Tp)
    }
    /// This rank's column (same weights, other tokens) as a group of its own.
    pub fn cp(&mut self) -> SubGroup<'_> {
        self.sub(Axis::Cp)
    }
    /// The whole group.
    pub fn all(&mut self) -> SubGroup<'_> {
        self.sub(Axis::All)
    }

    fn sub(&mut self, axis: Axis) -> SubGroup<'_> {
        let rank = self.inner.rank();
        let (own, members, clock) = match axis {
            Axis::Tp => (self.row_comm.as_mut(), &self.row, &mut self.spent.tp),
            Axis::Cp => (self.column_comm.as_mut(), &self.column, &mut self.spent.cp),
            Axis::All => (None, &self.everyone, &mut self.spent.all),
        };
        let me = members.iter().position(|&r| r == rank).expect("a rank is in its row and column");
        match own {
            Some((comm, ids)) => SubGroup { inner: &mut **comm, members: ids, me, clock },
            None => SubGroup { inner: &mut *self.inner, members, me, clock },
        }
    }

    /// Whether the row's sums and gathers run on device buffers
    /// ([`Collective::all_reduce_sum_device`]): only where every rank of the group said it can
    /// (a device backend on a transport that moves device memory), so that the ranks of a row
    /// always make the same calls (a host-staged NCCL gather first agrees on lengths; a device
    /// one does not).
    pub fn device_collectives(&self) -> bool {
        self.device
    }

    /// Every rank says whether its buffers are device memory; the grid runs collectives on
    /// device buffers only if all say so and the transport moves device memory. Every rank of
    /// the group calls it once, when its engine forms.
    pub fn agree_device_collectives(&mut self, device_buffers: bool) -> Result<(), CommError> {
        let mine = device_buffers && self.inner.moves_device_memory();
        let all = self.all().all_gather(&[if mine { 1.0 } else { 0.0 }])?;
        self.device = all.iter().all(|v| v.as_slice() == [1.0]);
        Ok(())
    }

    /// Time spent in collectives since the last call.
    pub fn take_spent(&mut self) -> Spent {
        std::mem::take(&mut self.spent)
    }
}

/// Some ranks of a group as a group of their own: its rank `i` is the group's `members[i]`.
pub struct SubGroup<'a> {
    inner: &'a mut dyn Collective,
    members: &'a [usize],
    me: usize,
    clock: &'a mut Duration,
}

impl SubGroup<'_> {
    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn Collective, &[usize]) -> T) -> T {
        let started = Instant::now();
        let out = f(&mut *self.inner, self.members);
        *self.clock += started.elapsed();
        out
    }

    /// Whether the sub-group is the whole of its communicator (in order): its collectives are
    /// then the communicator's own (a row's all-reduce one NCCL call).
    fn whole(&self) -> bool {
        self.members.len() == self.inner.world()
    }

    fn member(&self, i: usize) -> Result<usize, CommError> {
        self.members
            .get(i)
            .copied()
            .ok_or(CommError::Protocol { peer: i, reason: "no such rank in the sub-group".into() })
    }
}

impl Collective for SubGroup<'_> {
    fn rank(&self) -> usize {
        self.me
    }
    fn world(&self) -> usize {
        self.members.len()
    }
    fn send(&mut self, to: usize, data: &[f32]) -> Result<(), CommError> {
        let to = self.member(to)?;
        self.timed(|c, _| c.send(to, data))
    }
    fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
        let from = self.member(from)?;
        self.timed(|c, _| c.recv(from))
    }
    fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        if self.members.len() == 1 {
            return Ok(vec![data.to_vec()]);
        }
        if self.whole() {
            return self.timed(|c, _| c.all_gather(data));
        }
        self.timed(|c, members| c.all_gather_among(members, data))
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        if self.members.len() == 1 {
            return Ok(());
        }
        if self.whole() {
            return self.timed(|c, _| c.all_reduce_sum(data));
        }
        // The default: an all-gather among the members, summed in rank order.
        let all = self.all_gather(data)?;
        super::sum_in_rank_order(&all, data)
    }
    /// On the device only where the sub-group has a communicator of its own (a row or column
    /// on NCCL); a sub-group of one has nothing to sum.
    unsafe fn all_reduce_sum_device(&mut self, addr: u64, len: usize) -> Result<bool, CommError> {
        if self.members.len() == 1 {
            return Ok(true);
        }
        if !self.whole() {
            return Ok(false);
        }
        // SAFETY: the caller's guarantee, passed on.
        self.timed(|c, _| unsafe { c.all_reduce_sum_device(addr, len) })
    }
    /// On the device only where the sub-group is its communicator's whole (as above).
    unsafe fn all_gather_device(&mut self, send: u64, len: usize, recv: u64) -> Result<bool, CommError> {
        if !self.whole() {
            return Ok(false);
        }
        // SAFETY: the caller's guarantee, passed on.
        self.timed(|c, _| unsafe { c.all_gather_device(send, len, recv) })
    }
    fn all_gather_among(&mut self, members: &[usize], data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        let mapped = members.iter().map(|&i| self.member(i)).collect::<Result<Vec<_>, _>>()?;
        self.timed(|c, _| c.all_gather_among(&mapped, data))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::comm::tcp::tests::group;
    use crate::comm::TcpCollective;

    #[test]
    fn rows_and_columns_of_a_two_by_two_grid() {
        let results = group(4, Duration::from_secs(10), |c| {
            let mut g = Grid::new(Box::new(c), 2).unwrap();
            let (r, t, cp) = (g.rank(), g.tp_rank(), g.cp_rank());
            assert_eq!((g.tp_size(), g.cp_size(), g.world()), (2, 2, 4));
            assert_eq!(r, cp * 2 + t);
            // Large payloads in both sub-groups, so that a row's traffic cannot wait on a
            // column's.
            let mine: Vec<f32> = (0..200_000 + r).map(|i| (i * 4 + r) as f32).collect();
            let row = g.tp().all_gather(&mine).unwrap();
            assert_eq!(row.iter().map(Vec::len).collect::<Vec<_>>(), [cp * 2, cp * 2 + 1].map(|j| 200_000 + j));
            let column = g.cp().all_gather(&mine).unwrap();
            assert_eq!(column.iter().map(|v| v[0] as usize).collect::<Vec<_>>(), vec![t, 2 + t]);
            let mut sum = vec![r as f32; 3];
            g.tp().all_reduce_sum(&mut sum).unwrap();
            assert_eq!(sum, vec![(cp * 4 + 1) as f32; 3]);
            let mut b = if cp == 1 { vec![t as f32 + 0.5] } else { Vec::new() };
            g.cp().broadcast(1, &mut b).unwrap();
            assert_eq!(b, vec![t as f32 + 0.5]);
            g.all().barrier().unwrap();
            let spent = g.take_spent();
            assert!(spent.tp > Duration::ZERO && spent.cp > Duration::ZERO && spent.all > Duration::ZERO);
            r
        });
        assert_eq!(results, vec![0, 1, 2, 3]);
    }

    /// Only send and receive: the default, pairwise `all_gather_among`.
    struct PointToPoint(TcpCollective);

    impl Collective for PointToPoint {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world(&self) -> usize {
            self.0.world()
        }
        fn send(&mut self, to: usize, data: &[f32]) -> Result<(), CommError> {
            self.0.send(to, data)
        }
        fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
            self.0.recv(from)
        }
        fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
            let all: Vec<usize> = (0..self.world()).collect();
            self.all_gather_among(&all, data)
        }
    }

    #[test]
    fn pairwise_exchange_completes_with_payloads_beyond_socket_buffers() {
        let results = group(4, Duration::from_secs(20), |c| {
            let mut p = PointToPoint(c);
            let r = p.rank();
            let mine = vec![r as f32; 2_000_000];
            let all = p.all_gather(&mine).unwrap();
            let odd = if r % 2 == 1 { p.all_gather_among(&[1, 3], &[r as f32]).unwrap() } else { Vec::new() };
            assert!(p.all_gather_among(&[0, 0], &[]).is_err());
            (all.iter().map(|v| v[0]).collect::<Vec<_>>(), odd)
        });
        for (r, (all, odd)) in results.into_iter().enumerate() {
            assert_eq!(all, vec![0.0, 1.0, 2.0, 3.0]);
            assert_eq!(odd, if r % 2 == 1 { vec![vec![1.0], vec![3.0]] } else { Vec::new() });
        }
    }

    /// A transport with communicators of its own for sub-groups (as NCCL's): here separate TCP
    /// groups formed beforehand for each row and column. Counts what goes through the whole
    /// group's communicator.
    struct WithSubs {
        all: TcpCollective,
        subs: Vec<(Vec<usize>, TcpCollective)>,
        used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl WithSubs {
        fn count(&self) {
            self.used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl Collective for WithSubs {
        fn rank(&self) -> usize {
            self.all.rank()
        }
        fn world(&self) -> usize {
            self.all.world()
        }
        fn send(&mut self, to: usize, data: &[f32]) -> Result<(), CommError> {
            self.count();
            self.all.send(to, data)
        }
        fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
            self.count();
            self.all.recv(from)
        }
        fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
            self.count();
            self.all.all_gather(data)
        }
        fn all_gather_among(&mut self, members: &[usize], data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
            self.count();
            self.all.all_gather_among(members, data)
        }
        fn sub_communicator(&mut self, members: &[usize]) -> Result<Option<Box<dyn Collective>>, CommError> {
            let i = self.subs.iter().position(|(m, _)| m == members).expect("a sub-group formed beforehand");
            Ok(Some(Box::new(self.subs.remove(i).1)))
        }
    }

    /// Rows and columns with communicators of their own carry the grid's row and column
    /// collectives; the whole group's carries only the whole group's.
    #[test]
    fn rows_and_columns_use_their_own_communicators_where_the_transport_has_them() {
        use crate::comm::TcpOptions;
        use std::net::{SocketAddr, TcpListener};
        let opts = TcpOptions {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            cancel: None,
            formation: 0,
        };
        // Rows {0, 1}, {2, 3}; columns {0, 2}, {1, 3}: a listener per member of each.
        let groups: Vec<Vec<usize>> = vec![vec![0, 1], vec![2, 3], vec![0, 2], vec![1, 3]];
        let listeners: Vec<Vec<std::sync::Mutex<Option<TcpListener>>>> = groups
            .iter()
            .map(|g| g.iter().map(|_| std::sync::Mutex::new(Some(TcpListener::bind("127.0.0.1:0").unwrap()))).collect())
            .collect();
        let addrs: Vec<Vec<SocketAddr>> = listeners
            .iter()
            .map(|g| g.iter().map(|l| l.lock().unwrap().as_ref().unwrap().local_addr().unwrap()).collect())
            .collect();
        let results = group(4, Duration::from_secs(10), |all| {
            let r = all.rank();
            // Each rank joins its row's group, then its column's (the same order on every rank).
            let subs = groups
                .iter()
                .enumerate()
                .filter_map(|(g, members)| {
                    let me = members.iter().position(|&m| m == r)?;
                    let l = listeners[g][me].lock().unwrap().take().unwrap();
                    Some((members.clone(), TcpCollective::connect(me, &addrs[g], l, &opts).unwrap()))
                })
                .collect();
            let used = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut g = Grid::new(Box::new(WithSubs { all, subs, used: used.clone() }), 2).unwrap();
            let (t, cp) = (g.tp_rank(), g.cp_rank());
            let mut sum = vec![r as f32; 3];
            g.tp().all_reduce_sum(&mut sum).unwrap();
            assert_eq!(sum, vec![(cp * 4 + 1) as f32; 3]);
            let column = g.cp().all_gather(&[r as f32]).unwrap();
            assert_eq!(column, vec![vec![t as f32], vec![(2 + t) as f32]]);
            let mut b = if cp == 1 { vec![t as f32 + 0.5] } else { Vec::new() };
            g.cp().broadcast(1, &mut b).unwrap();
            assert_eq!(b, vec![t as f32 + 0.5]);
            let spent = g.take_spent();
            assert!(spent.tp > Duration::ZERO && spent.cp > Duration::ZERO);
            let used = || used.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(used(), 0, "a row's or column's collective went through the whole group");
            g.all().barrier().unwrap();
            assert!(used() > 0);
            r
        });
        assert_eq!(results, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_grid_that_does_not_divide_the_group_is_refused() {
        group(2, Duration::from_secs(10), |c| assert!(Grid::new(Box::new(c), 3).is_err()));
        let mut g = Grid::single();
        assert_eq!(g.tp().all_gather(&[1.0]).unwrap(), vec![vec![1.0]]);
    }
}
