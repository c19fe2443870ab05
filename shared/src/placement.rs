//! Which worker holds which layers: contiguous layer ranges, one per pipeline stage.

use std::ops::Range;

/// Splits `num_layers` layers into `stages` contiguous ranges as evenly as possible, earlier
/// stages taking the remainder.
pub fn even_split(num_layers: usize, stages: usize) -> Vec<Range<usize>> {
    let stages = stages.clamp(1, num_layers.max(1));
    let base = num_layers / stages;
    let extra = num_layers % stages;
    let mut out = Vec::with_capacity(stages);
    let mut start = 0;
    for s in 0..stages {
        let n = base + usize::from(s < extra);
        out.push(start..start + n);
        start += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_every_layer_once() {
        assert_eq!(even_split(6, 1), vec![0..6]);
        assert_eq!(even_split(6, 4), vec![0..2, 2..4, 4..5, 5..6]);
        assert_eq!(even_split(2, 3), vec![0..1, 1..2]);
    }
}
