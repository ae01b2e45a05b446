//! Turning logits into tokens: repetition, presence and frequency penalties from the sequence's
//! history, then greedy, or temperature with top-k / top-p / min-p filtering, drawn from a
//! per-request seeded generator so the same seed gives the same tokens (and every rank of a group
//! draws the same token). Log-probabilities are of the model's raw distribution.

use std::borrow::Cow;
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernels::log_softmax;

/// Highest temperature accepted: far beyond any useful one (the distribution is already flat).
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Highest repetition penalty accepted.
pub const MAX_REPETITION_PENALTY: f32 = 10.0;
/// Largest magnitude of the presence and frequency penalties (OpenAI's range).
pub const MAX_ADDITIVE_PENALTY: f32 = 2.0;

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
    /// Divides the positive logit (multiplies the negative one) of every token that appeared in
    /// the prompt or the output so far; 1 is off. As in vLLM and Hugging Face.
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token generated at least once (prompt tokens do not
    /// count); 0 is off. As in OpenAI's API.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (prompt tokens do not
    /// count); 0 is off. As in OpenAI's API.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("temperature {0} exceeds the limit of {max}", max = MAX_TEMPERATURE)]
    TemperatureTooHigh(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be a finite number in (0, {max}], got {0}", max = MAX_REPETITION_PENALTY)]
    RepetitionPenalty(f32),
    #[error("presence_penalty must be a finite number in [-{max}, {max}], got {0}", max = MAX_ADDITIVE_PENALTY)]
    PresencePenalty(f32),
    #[error("frequency_penalty must be a finite number in [-{max}, {max}], got {0}", max = MAX_ADDITIVE_PENALTY)]
    FrequencyPenalty(f32),
}

impl SamplingError {
    /// The setting at fault, as the wire formats name it.
    pub fn field(&self) -> &'static str {
        match self {
            SamplingError::Temperature(_) | SamplingError::TemperatureTooHigh(_) => "temperature",
            SamplingError::TopP(_) => "top_p",
            SamplingError::MinP(_) => "min_p",
            SamplingError::RepetitionPenalty(_) => "repetition_penalty",
            SamplingError::PresencePenalty(_) => "presence_penalty",
            SamplingError::FrequencyPenalty(_) => "frequency_penalty",
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if self.temperature > MAX_TEMPERATURE {
            return Err(SamplingError::TemperatureTooHigh(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        // `contains` is false for NaN; the infinities are outside every range.
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= MAX_REPETITION_PENALTY) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        let additive = -MAX_ADDITIVE_PENALTY..=MAX_ADDITIVE_PENALTY;
        if !additive.contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        if !additive.contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        Ok(())
    }

    /// The repetition penalty is on: it reads the prompt's tokens, not only the generated ones.
    pub fn repetition_on(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    fn counts_on(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// A set of token ids as a bitset grown to the largest id seen: the vocabulary is not known
/// until the first logits arrive, and ids are below it (the engine refuses others before the
/// executor records them), so it stays within `vocab / 8` bytes.
#[derive(Debug, Default)]
struct TokenSet {
    words: Vec<u64>,
}

impl TokenSet {
    fn insert(&mut self, token: u32) {
        let word = (token / 64) as usize;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (token % 64);
    }

    fn for_each(&self, mut f: impl FnMut(u32)) {
        for (i, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                f(i as u32 * 64 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
    }
}

/// What the penalties need of a sequence's past, and nothing when they are off.
#[derive(Debug, Default)]
struct History {
    /// Tokens of the prompt and the output (repetition penalty on).
    seen: Option<TokenSet>,
    /// Times each token was generated (presence or frequency penalty on).
    generated: Option<HashMap<u32, u32>>,
}

/// A request's sampler: its parameters, its random stream, and the history its penalties use.
///
/// The history is fed by the caller: [`Sampler::observe_prompt`] with every prompt token and
/// [`Sampler::observe_generated`] with every generated token, before the next [`Sampler::sample`].
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    history: History,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        let history = History {
            seen: params.repetition_on().then(TokenSet::default),
            generated: params.counts_on().then(HashMap::new),
        };
        Sampler { params, rng, history }
    }

    /// Records prompt tokens (they count for the repetition penalty only).
    pub fn observe_prompt(&mut self, tokens: &[u32]) {
        if let Some(seen) = &mut self.history.seen {
            tokens.iter().for_each(|&t| seen.insert(t));
        }
    }

    /// Records a generated token (it counts for every penalty).
    pub fn observe_generated(&mut self, token: u32) {
        if let Some(seen) = &mut self.history.seen {
            seen.insert(token);
        }
        if let Some(counts) = &mut self.history.generated {
            *counts.entry(token).or_insert(0) += 1;
        }
    }

    /// The logits `sample` draws from: `logits` with the penalties of the history applied
    /// (repetition first, then frequency, then presence, as vLLM does). Borrowed when every
    /// penalty is off. Ids beyond `logits` are ignored.
    pub fn penalised<'a>(&self, logits: &'a [f32]) -> Cow<'a, [f32]> {
        let (seen, generated) = (&self.history.seen, &self.history.generated);
        if seen.is_none() && generated.is_none() {
            return Cow::Borrowed(logits);
        }
        let mut out = logits.to_vec();
        if let Some(seen) = seen {
            let r = self.params.repetition_penalty;
            seen.for_each(|t| {
                if let Some(v) = out.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / r } else { *v * r };
                }
            });
        }
        if let Some(counts) = generated {
            let p = &self.params;
            for (&t, &n) in counts {
                if let Some(v) = out.get_mut(t as usize) {
                    *v -= p.frequency_penalty * n as f32;
                    *v -= p.presence_penalty;
                }
            }
        }
        Cow::Owned(out)
    }

    /// The next token, from the penalised logits (greedy included). The caller reports
    /// log-probabilities from the raw `logits`, not from what the penalties made of them.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let logits = self.penalised(logits);
        self.draw(&logits)
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
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
    // The largest value in running maxima (a loop that vectorises), then the first position
    // that holds it: the lowest index among ties. NaNs are never the largest; an input of only
    // NaNs gives 0.
    let max = log_softmax::max(logits);
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// `log softmax(logits)`: each logit less the normaliser `ln Σ e^v`
/// ([`log_softmax::log_sum_exp`], computed in f64).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_softmax::log_sum_exp(logits);
    logits.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// One token's log-probability, `log_softmax(logits)[token]` without the rest of the row.
///
/// # Panics
/// If `token` is not below `logits.len()`.
pub fn logprob(logits: &[f32], token: u32) -> f32 {
    (logits[token as usize] as f64 - log_softmax::log_sum_exp(logits)) as f32
}

/// The k most likely tokens with their log-probabilities, most likely first.
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logprobs.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let order = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
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
        SamplingParams { temperature, top_k, top_p, seed, ..SamplingParams::default() }
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
        for t in 0..4 {
            assert_eq!(logprob(&logits, t), lp[t as usize]);
        }
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

    /// Tokens the sampler drew before penalties existed, for three settings and fixed logits:
    /// with the penalties at their defaults nothing may change, history or not.
    #[test]
    fn defaults_draw_the_same_tokens_as_before_penalties() {
        let cases: [(SamplingParams, [u32; 24]); 3] = [
            (
                SamplingParams::default(),
                [12, 34, 8, 30, 15, 37, 22, 44, 18, 40, 25, 47, 21, 43, 28, 2, 24, 9, 31, 5, 27, 12, 34, 19],
            ),
            (
                params(0.8, 0, 1.0, 42),
                [16, 31, 34, 26, 41, 0, 33, 3, 11, 29, 47, 28, 24, 10, 21, 13, 39, 46, 46, 5, 38, 23, 30, 19],
            ),
            (
                SamplingParams { min_p: 0.05, ..params(1.3, 5, 0.9, 7) },
                [12, 34, 30, 19, 26, 0, 22, 18, 29, 18, 25, 36, 10, 6, 39, 39, 35, 9, 20, 16, 1, 38, 34, 19],
            ),
        ];
        for (p, want) in cases {
            let mut s = Sampler::new(p.clone());
            s.observe_prompt(&[12, 34, 8]);
            assert!(s.history.seen.is_none() && s.history.generated.is_none(), "defaults keep no history");
            let got: Vec<u32> = (0..24)
                .map(|step| {
                    let logits: Vec<f32> =
                        (0..50).map(|i| ((i as f32) * 1.7 + step as f32 * 0.3).sin() * 3.0).collect();
                    assert!(matches!(s.penalised(&logits), Cow::Borrowed(_)));
                    let t = s.sample(&logits);
                    s.observe_generated(t);
                    t
                })
                .collect();
            assert_eq!(got, want, "{p:?}");
        }
    }

    #[test]
    fn history_is_kept_only_for_the_penalties_on() {
        let rep = Sampler::new(SamplingParams { repetition_penalty: 1.1, ..Default::default() });
        assert!(rep.history.seen.is_some() && rep.history.generated.is_none());
        for p in [
            SamplingParams { presence_penalty: 0.5, ..Default::default() },
            SamplingParams { frequency_penalty: -0.5, ..Default::default() },
        ] {
            let mut s = Sampler::new(p);
            assert!(s.history.seen.is_none());
            s.observe_prompt(&[1, 2, 3]);
            assert!(s.history.generated.as_ref().unwrap().is_empty(), "prompt tokens are not counted");
            s.observe_generated(7);
            s.observe_generated(7);
            assert_eq!(s.history.generated.as_ref().unwrap().get(&7), Some(&2));
        }
        // The bitset grows to the largest id seen, one word per 64 ids.
        let mut set = TokenSet::default();
        set.insert(5);
        assert_eq!(set.words.len(), 1);
        for t in [130, 64, 5, 63] {
            set.insert(t);
        }
        assert_eq!(set.words.len(), 3);
        let mut ids = Vec::new();
        set.for_each(|t| ids.push(t));
        assert_eq!(ids, [5, 63, 64, 130]);
    }

    fn greedy(repetition_penalty: f32, presence_penalty: f32, frequency_penalty: f32) -> Sampler {
        Sampler::new(SamplingParams { repetition_penalty, presence_penalty, frequency_penalty, ..Default::default() })
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output() {
        let logits = [2.0, 1.9, -1.0, -1.1];
        // From the prompt: 2 / 1.2 ≈ 1.67 < 1.9.
        let mut s = greedy(1.2, 0.0, 0.0);
        assert_eq!(s.sample(&logits), 0);
        s.observe_prompt(&[0]);
        assert_eq!(s.sample(&logits), 1);
        assert_eq!(s.penalised(&logits)[..2], [2.0 / 1.2, 1.9]);
        // From the output, and on negative logits: -1 × 1.2 < -1.1.
        let negative = [-1.0, -1.1];
        let mut s = greedy(1.2, 0.0, 0.0);
        s.observe_generated(0);
        assert_eq!(s.sample(&negative), 1);
        // Below 1 it rewards repetition.
        let mut s = greedy(0.5, 0.0, 0.0);
        s.observe_prompt(&[1]);
        assert_eq!(s.sample(&logits), 1);
        // Ids beyond the logits are ignored.
        let mut s = greedy(1.2, 0.0, 0.0);
        s.observe_prompt(&[500]);
        assert_eq!(s.penalised(&logits)[..], logits);
    }

    #[test]
    fn presence_penalty_counts_generated_tokens_once() {
        let logits = [2.0, 1.9, 0.0];
        let mut s = greedy(1.0, 0.5, 0.0);
        s.observe_prompt(&[0, 0, 0]);
        assert_eq!(s.sample(&logits), 0, "prompt tokens carry no presence penalty");
        s.observe_generated(0);
        assert_eq!(s.sample(&logits), 1);
        s.observe_generated(0);
        assert_eq!(s.penalised(&logits)[0], 1.5, "once, however many times");
        // Negative: encourages what was said.
        let mut s = greedy(1.0, -0.5, 0.0);
        s.observe_generated(1);
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn frequency_penalty_grows_with_each_generation() {
        let logits = [2.0, 1.9, 0.0];
        let mut s = greedy(1.0, 0.0, 0.06);
        s.observe_prompt(&[0, 0, 0]);
        assert_eq!(s.sample(&logits), 0, "prompt tokens carry no frequency penalty");
        s.observe_generated(0);
        assert_eq!(s.sample(&logits), 0, "2 - 0.06 > 1.9");
        s.observe_generated(0);
        assert_eq!(s.sample(&logits), 1, "2 - 0.12 < 1.9");
    }

    #[test]
    fn penalties_apply_before_temperature_and_filters() {
        // top_k 1 with penalties: the token left is the penalised argmax.
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..params(1.0, 1, 1.0, 3) });
        s.observe_prompt(&[2]);
        assert!((0..50).all(|_| s.sample(&[0.0, 1.0, 1.5]) == 1));
        // A huge presence penalty removes a token from the support.
        let mut s = Sampler::new(SamplingParams { presence_penalty: 2.0, ..params(0.05, 0, 1.0, 3) });
        s.observe_generated(1);
        assert!((0..200).all(|_| s.sample(&[0.0, 0.5, 0.0]) != 1));
    }

    #[test]
    fn validation_names_the_field_and_its_limit() {
        assert!(params(-1.0, 0, 1.0, 0).validate().unwrap_err().to_string().contains("temperature"));
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().unwrap_err().to_string().contains("top_p"));
        assert!(SamplingParams { min_p: 2.0, ..Default::default() }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("min_p"));
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());

        let err = params(100.5, 0, 1.0, 0).validate().unwrap_err();
        assert_eq!(err, SamplingError::TemperatureTooHigh(100.5));
        assert_eq!(err.to_string(), "temperature 100.5 exceeds the limit of 100");
        assert!(params(f32::INFINITY, 0, 1.0, 0).validate().is_err());
        assert!(params(MAX_TEMPERATURE, 0, 1.0, 0).validate().is_ok());

        let with = |r: f32, p: f32, f: f32| {
            SamplingParams { repetition_penalty: r, presence_penalty: p, frequency_penalty: f, ..Default::default() }
                .validate()
        };
        for r in [0.0, -1.0, 10.5, f32::NAN, f32::INFINITY] {
            assert!(matches!(with(r, 0.0, 0.0), Err(SamplingError::RepetitionPenalty(_))), "{r}");
        }
        let msg = with(10.5, 0.0, 0.0).unwrap_err().to_string();
        assert_eq!(msg, "repetition_penalty must be a finite number in (0, 10], got 10.5");
        for v in [-2.5, 2.5, f32::NAN, f32::NEG_INFINITY] {
            let p = with(1.0, v, 0.0).unwrap_err().to_string();
            assert!(p.starts_with("presence_penalty must be a finite number in [-2, 2]"), "{p}");
            let f = with(1.0, 0.0, v).unwrap_err().to_string();
            assert!(f.starts_with("frequency_penalty must be a finite number in [-2, 2]"), "{f}");
        }
        for (r, p, f) in [(10.0, 2.0, -2.0), (0.01, -2.0, 2.0), (1.0, 0.0, 0.0)] {
            assert_eq!(with(r, p, f), Ok(()));
        }
    }

    #[test]
    fn argmax_is_the_first_largest_in_any_lane() {
        let mut rng = 7u64;
        for n in [1usize, 5, 16, 17, 100_288] {
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    ((rng >> 40) % 1000) as f32 * 0.01 - 5.0
                })
                .collect();
            let want = (0..n).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
            assert_eq!(argmax(&logits) as usize, want, "n={n}");
        }
        // Ties go to the lowest index, in the tail as in the lanes; NaNs never win.
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        let mut v = vec![0.0f32; 40];
        v[33] = 2.0;
        v[38] = 2.0;
        v[3] = f32::NAN;
        assert_eq!(argmax(&v), 33);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }
}
