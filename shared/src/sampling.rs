//! Next-token selection with transformers' semantics: repetition penalty, then temperature,
//! top-k and top-p warpers, then a seeded multinomial draw — or argmax when greedy.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// Validated sampling parameters for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks the ranges DESIGN.md fixes, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Sampling(format!("temperature must be finite and >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Sampling(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::Sampling(format!("repetition_penalty must be finite and > 0, got {}", self.repetition_penalty)));
        }
        Ok(())
    }

    /// Whether the choice is deterministic argmax. Temperatures too small to divide by
    /// without overflowing to infinity are greedy in effect, and treated so.
    pub fn greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}

/// The sampler of one sequence: its parameters, its random stream and the tokens it has seen.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// A sampler whose random stream depends on the seed alone.
    pub fn new(params: SamplingParams) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given every token of the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut scores = logits.to_vec();
        apply_repetition_penalty(&mut scores, history, self.params.repetition_penalty);
        if self.params.greedy() {
            return argmax(&scores);
        }
        for s in scores.iter_mut() {
            *s /= self.params.temperature;
        }
        if self.params.top_k > 0 {
            apply_top_k(&mut scores, self.params.top_k);
        }
        if self.params.top_p < 1.0 {
            apply_top_p(&mut scores, self.params.top_p);
        }
        let probs = softmax(&scores);
        let u: f32 = self.rng.random();
        let mut acc = 0.0f32;
        let mut last_nonzero = 0;
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                last_nonzero = i;
                acc += p;
                if u < acc {
                    return i as u32;
                }
            }
        }
        last_nonzero as u32
    }
}

/// transformers' RepetitionPenaltyLogitsProcessor: every token already in the sequence has its
/// score divided by the penalty when positive and multiplied when negative.
pub fn apply_repetition_penalty(scores: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &t in history {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// transformers' TopKLogitsWarper: scores below the k-th largest become -inf (ties kept).
pub fn apply_top_k(scores: &mut [f32], k: usize) {
    if k >= scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// transformers' TopPLogitsWarper: in ascending order of probability, drop tokens while the
/// cumulative probability stays at or below 1 - top_p, always keeping the most likely one.
pub fn apply_top_p(scores: &mut [f32], top_p: f32) {
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable ascending sort, as torch.sort(descending=False) is for these purposes.
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut cum = 0.0f32;
    let last = order.len().saturating_sub(1);
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= 1.0 - top_p && rank < last {
            scores[i] = f32::NEG_INFINITY;
        } else {
            break;
        }
    }
}

/// Index of the largest score; the first one on ties, as torch.argmax.
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Softmax in f32, -inf scores getting probability 0.
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_after_penalty() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 4.0, ..Default::default() });
        // Token 1 leads, but it was already produced: 3.0 / 4 < 2.0.
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1]), 2);
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn penalty_multiplies_negative_scores() {
        let mut s = vec![-1.0, 2.0];
        apply_repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        assert_eq!(s, vec![-2.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties() {
        let mut s = vec![1.0, 3.0, 3.0, 2.0];
        apply_top_k(&mut s, 1);
        assert_eq!(s, vec![f32::NEG_INFINITY, 3.0, 3.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities ~ [0.66, 0.24, 0.09, 0.01]
        let mut s = vec![4.0, 3.0, 2.0, 0.0];
        apply_top_p(&mut s, 0.8);
        assert!(s[0].is_finite() && s[1].is_finite());
        assert!(s[2] == f32::NEG_INFINITY && s[3] == f32::NEG_INFINITY, "{s:?}");
        let mut one = vec![1.0, 5.0];
        apply_top_p(&mut one, 0.01);
        assert_eq!(one[1], 5.0);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed, ..Default::default() });
            (0..40).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn vanishing_temperature_is_greedy_not_nan() {
        let mut s = Sampler::new(SamplingParams { temperature: 1e-30, seed: 3, ..Default::default() });
        assert_eq!(s.sample(&[0.5, 2.0, 1.0], &[]), 1);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |p: SamplingParams| p.validate().unwrap_err().to_string();
        assert!(bad(SamplingParams { temperature: -1.0, ..Default::default() }).contains("temperature"));
        assert!(bad(SamplingParams { temperature: f32::NAN, ..Default::default() }).contains("temperature"));
        assert!(bad(SamplingParams { top_p: 0.0, ..Default::default() }).contains("top_p"));
        assert!(bad(SamplingParams { top_p: 1.5, ..Default::default() }).contains("top_p"));
        assert!(bad(SamplingParams { repetition_penalty: 0.0, ..Default::default() }).contains("repetition_penalty"));
    }
}
