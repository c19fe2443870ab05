//! Content addresses of KV blocks, for prefix caching (vLLM's automatic prefix caching): a full
//! block is named by a hash chained over its parent block's hash and its own tokens, starting
//! from a root that hashes everything else that changes the block's keys and values (the model,
//! its revision, the dtype, the tenant and the request's `cache_salt`). Two sequences whose
//! first k blocks have the same hashes hold the same keys and values in them, so the scheduler
//! can hand the second one the first one's blocks; every stage recomputes the chain from the
//! tokens and checks it before reading a shared block, so a block that holds anything else is
//! never read.
//!
//! SHA-256 cut to 128 bits: the hash must agree across processes and machines (Rust's
//! `Hasher`s do not promise that), and a collision would silently serve another prompt's
//! keys and values.

use sha2::{Digest, Sha256};

/// A block's content address.
pub type BlockHash = [u8; 16];

/// The length of a [`BlockHash`] on the wire.
pub const HASH_LEN: usize = 16;

fn cut(d: impl AsRef<[u8]>) -> BlockHash {
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&d.as_ref()[..HASH_LEN]);
    out
}

/// The root of a chain: `parts` hashed together, each length-prefixed so that no two lists of
/// parts run into the same bytes.
pub fn root(parts: &[&[u8]]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"shardserve prefix v1");
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    cut(h.finalize())
}

/// The hash of a full block holding `tokens`, whose parent's hash (or the root) is `parent`.
pub fn block_hash(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    cut(h.finalize())
}

/// The hashes of the full blocks of `block_size` tokens at the start of `tokens` (a trailing
/// partial block has none).
pub fn chain(root: &BlockHash, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = *root;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            parent = block_hash(&parent, block);
            parent
        })
        .collect()
}

/// A [`BlockHash`] from wire bytes; `None` when they are not exactly [`HASH_LEN`] long.
pub fn from_bytes(b: &[u8]) -> Option<BlockHash> {
    b.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_depends_on_its_parent_and_its_tokens() {
        let r = root(&[b"model", b"main"]);
        let c = chain(&r, &[1, 2, 3, 4, 5, 6, 7], 3);
        // Two full blocks; the 7th token is a partial block with no hash.
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], block_hash(&r, &[1, 2, 3]));
        assert_eq!(c[1], block_hash(&c[0], &[4, 5, 6]));
        // The same tokens under another parent are another block.
        assert_ne!(block_hash(&c[0], &[1, 2, 3]), c[0]);
        // A chain is a prefix of a longer one's.
        assert_eq!(chain(&r, &[1, 2, 3, 4, 5, 6, 9, 9, 9], 3)[..2], c[..]);
    }

    #[test]
    fn roots_differ_by_every_part_and_by_where_parts_split() {
        let a = root(&[b"m", b"rev", b"f32", b"", b""]);
        assert_ne!(a, root(&[b"m", b"rev", b"f32", b"", b"salt"]));
        assert_ne!(a, root(&[b"m", b"rev", b"bf16", b"", b""]));
        assert_ne!(root(&[b"ab", b"c"]), root(&[b"a", b"bc"]));
        assert_eq!(a, root(&[b"m", b"rev", b"f32", b"", b""]));
    }

    #[test]
    fn hashes_are_stable_across_processes() {
        // Fixed bytes (Python: sha256(bytes(16) + (0).to_bytes(4, "little"))[:16]): every worker
        // and coordinator, on any machine, names a block the same.
        let r = root(&[b"x"]);
        assert_eq!(hex(&r), hex(&root(&[b"x"])));
        assert_eq!(from_bytes(&r), Some(r));
        assert_eq!(from_bytes(&r[..15]), None);
        assert_eq!(hex(&block_hash(&[0; 16], &[0])), "de47c9b27eb8d300dbb5f2c353e632c3");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
