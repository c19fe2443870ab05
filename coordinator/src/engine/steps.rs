//! What goes into the next step — pure arithmetic, tested on its own: which sequences get rows
//! and how many, how many sequences each micro-batch takes, and KV blocks per sequence.

/// The rows of the next step for sequences that still have `remaining[i]` tokens to feed, in
/// admission order: decode rows (one token left) first, then prefill chunks of at most `chunk`
/// tokens each, at most `max_seqs` sequences and `max_tokens` rows in all. A long prompt is
/// cut into chunks that ride along with the decodes, so it never stalls the running streams.
/// Returns (index into `remaining`, rows).
pub(super) fn plan(remaining: &[usize], max_seqs: usize, max_tokens: usize, chunk: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut budget = max_tokens;
    let decodes = remaining.iter().enumerate().filter(|(_, &r)| r == 1);
    let prefills = remaining.iter().enumerate().filter(|(_, &r)| r > 1);
    for (i, &r) in decodes.chain(prefills) {
        if out.len() == max_seqs || budget == 0 {
            break;
        }
        let rows = r.min(chunk.max(1)).min(budget);
        out.push((i, rows));
        budget -= rows;
    }
    out
}

/// How many of `ready` sequences the next step takes, when `running` sequences share a
/// pipeline of `depth` stages with `in_flight` steps out (0: wait for one to come back).
///
/// Each step takes an even share (`running / depth`, rounded up), so every stage works on a
/// micro-batch of the same size. With steps out, a step is sent only once at least
/// `running / depth` (rounded down) are ready: sending the few that came back early would leave
/// the micro-batches uneven for good (one sequence in one, fifteen in the other), and the
/// stages would take turns instead of working at once.
pub(super) fn micro_batch(ready: usize, running: usize, depth: usize, in_flight: usize, max: usize) -> usize {
    let depth = depth.max(1);
    if in_flight > 0 && ready < (running / depth).max(1) {
        return 0;
    }
    ready.min(running.div_ceil(depth)).min(max)
}

/// KV blocks of `block_size` tokens that `tokens` tokens need.
pub(super) fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_go_first_then_prefill_chunks_within_the_budget() {
        // Two prefills (100 and 7 tokens left) and two decodes.
        let rows = plan(&[100, 1, 7, 1], 8, 40, 32);
        assert_eq!(rows, vec![(1, 1), (3, 1), (0, 32), (2, 6)]);
    }

    #[test]
    fn the_step_is_bounded_by_sequences_and_tokens() {
        assert_eq!(plan(&[1, 1, 1, 1], 3, 100, 16), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(plan(&[1, 1, 50], 8, 2, 16), vec![(0, 1), (1, 1)]);
        assert_eq!(plan(&[50, 50], 8, 20, 16), vec![(0, 16), (1, 4)]);
        assert!(plan(&[], 8, 20, 16).is_empty());
    }

    #[test]
    fn micro_batches_are_even_shares_of_the_running_set() {
        // 16 sequences over a 2-stage pipeline with nothing in flight: 8 now, 8 next.
        assert_eq!(micro_batch(16, 16, 2, 0, 64), 8);
        assert_eq!(micro_batch(8, 16, 2, 1, 64), 8);
        // One came back early while 15 are out: it waits for an even share.
        assert_eq!(micro_batch(1, 16, 2, 1, 64), 0);
        // Nothing out: whatever is ready goes (a lone first request).
        assert_eq!(micro_batch(1, 1, 2, 0, 64), 1);
        assert_eq!(micro_batch(1, 16, 2, 0, 64), 1);
        // A sequence finished: 7 of 15 are enough to go.
        assert_eq!(micro_batch(7, 15, 2, 1, 64), 7);
        // One stage: everything ready, up to the limit.
        assert_eq!(micro_batch(100, 100, 1, 0, 32), 32);
        assert_eq!(micro_batch(0, 3, 3, 1, 32), 0);
    }

    #[test]
    fn blocks_round_up() {
        assert_eq!(blocks_for(0, 16), 0);
        assert_eq!(blocks_for(1, 16), 1);
        assert_eq!(blocks_for(16, 16), 1);
        assert_eq!(blocks_for(17, 16), 2);
    }
}
