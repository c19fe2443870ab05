//! Teacher forcing, shared by the tests that hold a quantized model against its full one, and
//! a tensor-parallel stage in one process (ranks on threads joined by the TCP collective).
// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use shardserve::collective::tcp::{read_hello, Link, TcpGroup};
use shardserve::collective::TpRank;
use shardserve::model::{KvPool, Shard, StageInput, StageOutput, StageSpec};
use std::net::TcpListener;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// The logits after the prompt and after each forced token but the last, through `stages` in
/// order.
pub fn teacher_forced(stages: &[Shard], prompt: &[u32], forced: &[u32]) -> Logits {
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
    let pairs: Vec<_> = cases.iter().map(|(p, f)| (teacher_forced(full, p, f), teacher_forced(quantized, p, f))).collect();
    agreement(&pairs)
}

/// The logits of every position of one sequence.
pub type Logits = Vec<Vec<f32>>;

/// Top-1 agreement and mean KL divergence (of the second from the first) over pairs of
/// teacher-forced logits.
pub fn agreement(pairs: &[(Logits, Logits)]) -> (f64, f64) {
    let (mut agree, mut total, mut kl) = (0usize, 0usize, 0f64);
    for (a, b) in pairs {
        assert_eq!(a.len(), b.len(), "as many positions on both sides");
        for (la, lb) in a.iter().zip(b) {
            total += 1;
            agree += usize::from(shardserve::sampling::argmax(la) == shardserve::sampling::argmax(lb));
            let (pa, pb) = (log_softmax(la), log_softmax(lb));
            kl += pa.iter().zip(&pb).map(|(x, y)| x.exp() * (x - y)).sum::<f64>();
        }
    }
    (agree as f64 / total as f64, kl / total as f64)
}

/// Makes a rank's shard from its stage spec.
pub type Loader = Arc<dyn Fn(StageSpec) -> Shard + Send + Sync>;

/// A tensor-parallel stage of `tp` ranks over `whole`: rank 0 here, the others on threads fed
/// the same tokens, joined by the TCP collective. One sequence, from its first token.
pub struct TpStage {
    pub leader: Shard,
    cache: KvPool,
    feeds: Vec<mpsc::Sender<Vec<u32>>>,
    followers: Vec<std::thread::JoinHandle<Shard>>,
}

impl TpStage {
    pub fn new(whole: StageSpec, tp: usize, load: Loader) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let names: Vec<String> = (0..tp).map(|r| format!("r{r}")).collect();
        let t = Duration::from_secs(20);
        let mut feeds = Vec::new();
        let mut followers = Vec::new();
        for rank in 1..tp {
            let (tx, rx) = mpsc::channel::<Vec<u32>>();
            feeds.push(tx);
            let (addr, names, load, whole) = (addr.clone(), names.clone(), load.clone(), whole.clone());
            followers.push(std::thread::spawn(move || {
                let mut shard = load(whole.with_tp(TpRank { rank, size: tp }));
                let group = TcpGroup::follower(&addr, None, "g", rank, tp, names, t, t).unwrap();
                shard.set_group(Arc::new(group));
                let mut cache = shard.new_pool(64, 16).unwrap();
                while let Ok(tokens) = rx.recv() {
                    match shard.forward(&mut cache, 0, StageInput::Tokens(&tokens)).unwrap() {
                        StageOutput::Hidden(_) => {}
                        StageOutput::Logits(_) => panic!("only rank 0 holds lm_head"),
                    }
                }
                shard
            }));
        }
        let mut conns: Vec<_> = (1..tp)
            .map(|_| {
                let (s, _) = listener.accept().unwrap();
                let mut s = Link::plain(s).unwrap();
                let (_, r) = read_hello(&mut s).unwrap();
                (r, s)
            })
            .collect();
        conns.sort_by_key(|(r, _)| *r);
        let mut leader = load(whole.with_tp(TpRank { rank: 0, size: tp }));
        leader.set_group(Arc::new(TcpGroup::leader(conns.into_iter().map(|(_, s)| s).collect(), names, t).unwrap()));
        let cache = leader.new_pool(64, 16).unwrap();
        TpStage { leader, cache, feeds, followers }
    }

    /// The logits after `tokens`, the sequence's next tokens.
    pub fn step(&mut self, tokens: &[u32]) -> Vec<f32> {
        for f in &self.feeds {
            f.send(tokens.to_vec()).unwrap();
        }
        match self.leader.forward(&mut self.cache, 0, StageInput::Tokens(tokens)).unwrap() {
            StageOutput::Logits(l) => l.to_vec1().unwrap(),
            StageOutput::Hidden(_) => panic!("rank 0 of the last stage returns logits"),
        }
    }

    /// Teacher forcing, as [`teacher_forced`], on this stage's sequence.
    pub fn teacher_forced(&mut self, prompt: &[u32], forced: &[u32]) -> Logits {
        let mut out = vec![self.step(prompt)];
        for t in &forced[..forced.len().saturating_sub(1)] {
            out.push(self.step(&[*t]));
        }
        out
    }

    /// Stops the followers and gives back every rank's shard, the followers'.
    pub fn finish(self) -> Vec<Shard> {
        drop(self.feeds);
        self.followers.into_iter().map(|t| t.join().unwrap()).collect()
    }
}
