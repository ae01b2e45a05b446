//! A collective that counts the time spent in it (waiting for peers included): how much of a
//! step the group spends communicating.

use std::time::{Duration, Instant};

use super::{Collective, CommError};

pub struct Timed {
    inner: Box<dyn Collective>,
    spent: Duration,
}

impl Timed {
    pub fn new(inner: Box<dyn Collective>) -> Self {
        Timed { inner, spent: Duration::ZERO }
    }

    /// Time spent in collectives since the last call.
    pub fn take_spent(&mut self) -> Duration {
        std::mem::take(&mut self.spent)
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn Collective) -> T) -> T {
        let started = Instant::now();
        let out = f(&mut *self.inner);
        self.spent += started.elapsed();
        out
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn send(&mut self, to: usize, data: &[f32]) -> Result<(), CommError> {
        self.timed(|c| c.send(to, data))
    }
    fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
        self.timed(|c| c.recv(from))
    }
    fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        self.timed(|c| c.all_gather(data))
    }
    fn broadcast(&mut self, root: usize, data: &mut Vec<f32>) -> Result<(), CommError> {
        self.timed(|c| c.broadcast(root, data))
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        self.timed(|c| c.all_reduce_sum(data))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.timed(|c| c.barrier())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::SingleRank;

    #[test]
    fn counts_time_and_delegates() {
        let mut t = Timed::new(Box::new(SingleRank));
        assert_eq!(t.all_gather(&[1.0, 2.0]).unwrap(), vec![vec![1.0, 2.0]]);
        let mut v = vec![3.0];
        t.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, vec![3.0]);
        assert!(t.send(0, &[]).is_err());
        assert!(t.take_spent() > Duration::ZERO);
        assert_eq!(t.take_spent(), Duration::ZERO);
    }
}
