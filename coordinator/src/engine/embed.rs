//! What an embedding request asks: which positions' hidden states, and how they are reduced.

/// How an embedding request's hidden states are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The last position's (Qwen3 embedding models).
    Last,
    /// The mean over positions.
    Mean,
    /// Every position's (transformers' `last_hidden_state`).
    None,
}

impl Pooling {
    /// Its name, as requests give it.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Last => "last",
            Pooling::Mean => "mean",
            Pooling::None => "none",
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "last" => Ok(Pooling::Last),
            "mean" => Ok(Pooling::Mean),
            "none" => Ok(Pooling::None),
            other => Err(format!("pooling must be \"last\", \"mean\" or \"none\", got {other:?}")),
        }
    }
}

/// What an embedding request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedSpec {
    pub pooling: Pooling,
    /// Scale each vector to unit L2 norm.
    pub normalize: bool,
}

impl EmbedSpec {
    /// Reduces `rows` (positions × `dims`, row-major) as asked.
    pub fn pool(&self, rows: &[f32], dims: usize) -> Vec<Vec<f32>> {
        let n = rows.len().checked_div(dims).unwrap_or(0);
        let mut out: Vec<Vec<f32>> = match self.pooling {
            Pooling::None => rows.chunks(dims).map(<[f32]>::to_vec).collect(),
            Pooling::Last => rows.chunks(dims).last().map(<[f32]>::to_vec).into_iter().collect(),
            Pooling::Mean => {
                let mut sum = vec![0f64; dims];
                for r in rows.chunks(dims) {
                    for (s, v) in sum.iter_mut().zip(r) {
                        *s += f64::from(*v);
                    }
                }
                vec![sum.iter().map(|s| (s / n.max(1) as f64) as f32).collect()]
            }
        };
        if self.normalize {
            for v in &mut out {
                let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_reduces_the_rows_as_asked() {
        let rows = [1.0, 2.0, 3.0, 6.0]; // two positions of two dims
        let spec = |pooling, normalize| EmbedSpec { pooling, normalize };
        assert_eq!(spec(Pooling::None, false).pool(&rows, 2), vec![vec![1.0, 2.0], vec![3.0, 6.0]]);
        assert_eq!(spec(Pooling::Last, false).pool(&rows, 2), vec![vec![3.0, 6.0]]);
        assert_eq!(spec(Pooling::Mean, false).pool(&rows, 2), vec![vec![2.0, 4.0]]);
        assert_eq!(spec(Pooling::Last, true).pool(&[3.0, 4.0], 2), vec![vec![0.6, 0.8]]);
        // A zero vector stays zero rather than dividing by nothing.
        assert_eq!(spec(Pooling::Last, true).pool(&[0.0, 0.0], 2), vec![vec![0.0, 0.0]]);
        assert_eq!("".parse::<Pooling>(), Ok(Pooling::Last));
        assert!("max".parse::<Pooling>().unwrap_err().contains("\"last\", \"mean\" or \"none\""));
    }
}
