//! Turning logits into tokens: greedy, or temperature with top-k / top-p / min-p filtering, drawn
//! from a per-request seeded generator so the same seed gives the same tokens (and every rank of
//! a group draws the same token). Log-probabilities are of the model's raw distribution.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one's probability; 0 keeps all.
    pub min_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 0 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        Ok(())
    }
}

/// A request's sampler: its parameters and its random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        // Candidates by descending logit (ties: lower id first, so the order is deterministic).
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize] / p.temperature;
        let mut probs: Vec<f64> =
            idx.iter().map(|&i| ((logits[i as usize] / p.temperature - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            keep = probs.iter().take_while(|&&q| q >= p.min_p as f64 * probs[0]).count().max(1);
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let n = probs[..keep]
                .iter()
                .take_while(|&&q| {
                    let before = cum;
                    cum += q;
                    before < p.top_p as f64
                })
                .count();
            keep = n.max(1);
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.random::<f64>() * kept;
        for (j, &q) in probs[..keep].iter().enumerate() {
            if u < q {
                return idx[j];
            }
            u -= q;
        }
        idx[keep - 1]
    }
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(logits)`, computed in f64 for the normaliser.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + logits.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
    logits.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// The k most likely tokens with their log-probabilities, most likely first.
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let order = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, min_p: 0.0, seed }
    }

    #[test]
    fn greedy_and_log_softmax() {
        let logits = [1.0, 3.0, 3.0, -2.0];
        assert_eq!(Sampler::new(SamplingParams::default()).sample(&logits), 1);
        let lp = log_softmax(&logits);
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        for (l, v) in lp.iter().zip(logits) {
            assert!((*l as f64 - (v as f64 - z.ln())).abs() < 1e-6);
        }
        assert_eq!(top_logprobs(&lp, 2), vec![(1, lp[1]), (2, lp[2])]);
        assert_eq!(top_logprobs(&lp, 10).len(), 4);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_softmax() {
        let logits: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(42);
        assert_eq!(a, draw(42));
        assert_ne!(a, draw(43));
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        for t in 0..6 {
            let freq = a.iter().filter(|&&x| x == t as u32).count() as f64 / a.len() as f64;
            let p = (logits[t] as f64).exp() / z;
            assert!((freq - p).abs() < 0.03, "token {t}: {freq} vs {p}");
        }
    }

    #[test]
    fn filters_restrict_the_support() {
        let logits = [0.0, 1.0, 2.0, 3.0, 4.0];
        let mut s = Sampler::new(params(2.0, 2, 1.0, 1));
        assert!((0..500).all(|_| s.sample(&logits) >= 3));
        // top_p 0.5 at temperature 1: p(4) ≈ 0.64 ≥ 0.5, so only token 4 remains.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 1));
        assert!((0..500).all(|_| s.sample(&logits) == 4));
        let mut s = Sampler::new(SamplingParams { min_p: 0.3, ..params(1.0, 0, 1.0, 1) });
        // p(3)/p(4) = e^-1 ≈ 0.37 ≥ 0.3; p(2)/p(4) ≈ 0.14 < 0.3.
        assert!((0..500).all(|_| s.sample(&logits) >= 3));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(params(-1.0, 0, 1.0, 0).validate().unwrap_err().to_string().contains("temperature"));
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().unwrap_err().to_string().contains("top_p"));
        assert!(SamplingParams { min_p: 2.0, ..Default::default() }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("min_p"));
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
    }
}
