//! Teacher forcing, shared by the tests that hold a quantized model against its full one.

use shardserve::model::{KvPool, Shard, StageInput, StageOutput};

/// The logits after the prompt and after each forced token but the last, through `stages` in
/// order.
pub fn teacher_forced(stages: &[Shard], prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut pools: Vec<KvPool> = stages.iter().map(|s| s.new_pool(64, 16).unwrap()).collect();
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    for next in forced {
        let mut input = StageInput::Tokens(&feed);
        for (s, pool) in stages.iter().zip(pools.iter_mut()) {
            match s.forward(pool, 0, input).unwrap() {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                StageOutput::Logits(l) => {
                    out.push(l.to_vec1::<f32>().unwrap());
                    input = StageInput::Tokens(&[]);
                }
            }
        }
        feed = vec![*next];
    }
    out
}

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    let sum: f64 = l.iter().map(|x| (*x as f64 - max).exp()).sum();
    l.iter().map(|x| *x as f64 - max - sum.ln()).collect()
}

/// Top-1 agreement of `quantized` with `full`, teacher-forced on `cases` (prompt, continuation),
/// and the mean KL divergence of the quantized distribution from the full one.
pub fn compare(full: &[Shard], quantized: &[Shard], cases: &[(Vec<u32>, Vec<u32>)]) -> (f64, f64) {
    let (mut agree, mut total, mut kl) = (0usize, 0usize, 0f64);
    for (prompt, forced) in cases {
        let a = teacher_forced(full, prompt, forced);
        let b = teacher_forced(quantized, prompt, forced);
        for (la, lb) in a.iter().zip(&b) {
            total += 1;
            agree += usize::from(shardserve::sampling::argmax(la) == shardserve::sampling::argmax(lb));
            let (pa, pb) = (log_softmax(la), log_softmax(lb));
            kl += pa.iter().zip(&pb).map(|(x, y)| x.exp() * (x - y)).sum::<f64>();
        }
    }
    (agree as f64 / total as f64, kl / total as f64)
}
