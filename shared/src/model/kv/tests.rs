//! The KV pool: blocks taken and given back, named by the scheduler, shared as cached prefixes, and gathered in order.

use super::*;

fn pool(blocks: usize) -> KvPool {
    KvPool::new(2, 2, 4, 4, blocks, DType::F32, &Device::Cpu).unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn the_pool_is_kept_off_huge_pages() {
    // 8 MiB a tensor: past any allocator's small sizes, so its own mapping.
    let p = KvPool::new(1, 8, 128, 16, 128, DType::F32, &Device::Cpu).unwrap();
    let (k, _) = &p.layers[0];
    let (storage, _) = k.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else { panic!("a CPU f32 pool") };
    let middle = v.as_ptr() as usize + v.len() * 2;
    // The mapping that holds the middle of the tensor carries MADV_NOHUGEPAGE ("nh").
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut flags = None;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
            inside = (a..b).contains(&middle);
        } else if let Some(f) = line.strip_prefix("VmFlags:").filter(|_| inside) {
            flags = Some(f.split_whitespace().map(str::to_string).collect::<Vec<_>>());
        }
    }
    let flags = flags.expect("the pool's mapping is in /proc/self/smaps");
    assert!(flags.iter().any(|f| f == "nh"), "{flags:?}");
}

#[test]
fn blocks_are_taken_as_tokens_arrive_and_all_come_back() {
    let mut p = pool(5);
    p.insert(1);
    p.insert(2);
    assert_eq!(p.blocks_needed(1, 5), 2);
    p.grow(1, 5).unwrap();
    p.advance(1, 5);
    assert_eq!(p.blocks_used(), 2);
    // 3 more tokens fit the second block.
    assert_eq!(p.blocks_needed(1, 3), 0);
    p.grow(2, 12).unwrap();
    p.advance(2, 12);
    assert_eq!(p.blocks_used(), 5);
    assert!(matches!(p.grow(1, 4), Err(Error::KvFull { needed: 1, free: 0, total: 5 })));
    // A failed grow takes nothing.
    assert_eq!(p.blocks_used(), 5);
    assert!(p.remove(2));
    assert!(!p.remove(2));
    assert_eq!(p.blocks_used(), 2);
    p.clear();
    assert_eq!((p.blocks_used(), p.sequences()), (0, 0));
}

#[test]
fn blocks_named_by_the_scheduler_must_be_free_and_as_many_as_needed() {
    let mut p = pool(6);
    p.insert(1);
    // 6 tokens of 4 a block need 2 blocks.
    assert!(p.grow_with(1, 6, &[3]).unwrap_err().to_string().contains("needs 2 new blocks"));
    p.grow_with(1, 6, &[3, 5]).unwrap();
    p.insert(2);
    assert!(p.grow_with(2, 1, &[5]).unwrap_err().to_string().contains("is held by sequence 1"));
    assert!(p.grow_with(2, 1, &[9]).unwrap_err().to_string().contains("outside the pool"));
    assert!(p.grow_with(2, 5, &[0, 0]).unwrap_err().to_string().contains("named twice"));
    // A refused grow takes nothing.
    assert_eq!(p.blocks_used(), 2);
    p.grow_with(2, 5, &[0, 1]).unwrap();
    assert_eq!(p.slots(2, 5), vec![0, 1, 2, 3, 4]);
    assert_eq!(p.slots(1, 6)[4..], [20, 21]);
    // Once named, a sequence's new blocks must be named.
    assert!(p.grow_with(2, 9, &[]).unwrap_err().to_string().contains("names none"));
}

#[test]
fn a_sequence_that_took_its_own_blocks_gives_them_up_to_named_ones() {
    let mut p = pool(4);
    // A client driving the stage directly: it takes the highest free blocks.
    p.insert(7);
    p.grow(7, 5).unwrap();
    assert_eq!(p.slots(7, 5)[..1], [12]);
    p.insert(8);
    assert_eq!(p.grow_with(8, 4, &[0]).unwrap(), Vec::<u64>::new());
    // The scheduler names block 3, which sequence 7 took: 7 is dropped.
    p.insert(9);
    assert_eq!(p.grow_with(9, 4, &[3]).unwrap(), vec![7]);
    assert!(!p.contains(7));
    assert_eq!(p.blocks_used(), 2);
    // A block of a named sequence is never given away.
    p.insert(10);
    assert!(p.grow_with(10, 4, &[0]).unwrap_err().to_string().contains("held by sequence 8"));
}

#[test]
fn filled_blocks_stay_cached_and_are_shared_only_for_the_prefix_they_hold() {
    let mut p = pool(8);
    let root = prefix::root(&[b"m"]);
    let toks: Vec<u32> = (1..=10).collect();
    p.insert_cached(1, Some(root), &[], &[]).unwrap();
    p.grow_with(1, 10, &[4, 2, 7]).unwrap();
    p.advance(1, 10);
    p.record(1, &toks);
    // Two full blocks are tagged; the third holds 2 tokens and is not.
    assert!(p.remove(1));
    assert_eq!((p.blocks_used(), p.blocks_cached()), (0, 2));
    p.insert_cached(2, Some(root), &[4, 2], &toks[..8]).unwrap();
    assert_eq!((p.len_of(2), p.blocks_used(), p.blocks_cached()), (Some(8), 2, 0));
    // Other tokens, another root, or a block that is not the prefix's: refused, and
    // nothing taken.
    let mut other = toks[..8].to_vec();
    other[6] = 99;
    assert!(p.insert_cached(3, Some(root), &[4, 2], &other).unwrap_err().to_string().contains("does not hold that prefix"));
    assert!(p.insert_cached(3, Some(prefix::root(&[b"x"])), &[4], &toks[..4]).is_err());
    assert!(p.insert_cached(3, Some(root), &[7], &toks[..4]).is_err());
    assert!(p.insert_cached(3, None, &[4], &toks[..4]).is_err());
    assert!(p.insert_cached(3, Some(root), &[4], &toks[..3]).unwrap_err().to_string().contains("do not fill"));
    assert_eq!((p.sequences(), p.blocks_used()), (1, 2));
    // Two sequences share block 4; neither may be given it to write.
    p.insert_cached(3, Some(root), &[4], &toks[..4]).unwrap();
    assert!(p.grow_with(3, 1, &[4]).is_err());
    p.grow_with(3, 1, &[0]).unwrap();
    p.advance(3, 1);
    p.record(3, &[50]);
    assert!(p.remove(2));
    // Block 4 is still held by sequence 3; block 2 is cached.
    assert_eq!((p.blocks_used(), p.blocks_cached()), (2, 1));
    assert!(p.remove(3));
    assert_eq!(p.blocks_cached(), 2);
    // Writing over cached blocks evicts them.
    p.insert(9);
    p.grow(9, 32).unwrap();
    assert_eq!((p.blocks_cached(), p.blocks_evicted()), (0, 2));
    assert!(p.insert_cached(10, Some(root), &[4], &toks[..4]).is_err());
    p.remove(9);
    // A reset forgets every prefix.
    p.insert_cached(1, Some(root), &[], &[]).unwrap();
    p.grow_with(1, 4, &[6]).unwrap();
    p.advance(1, 4);
    p.record(1, &toks[..4]);
    p.reset();
    assert_eq!((p.sequences(), p.blocks_used(), p.blocks_cached()), (0, 0, 0));
    assert!(p.insert_cached(1, Some(root), &[6], &toks[..4]).is_err());
}

#[test]
fn tags_follow_tokens_written_a_few_at_a_time() {
    let mut p = pool(4);
    let root = prefix::root(&[b"m"]);
    p.insert_cached(1, Some(root), &[], &[]).unwrap();
    let toks = [5u32, 6, 7, 8, 9, 10];
    // A prefill of 3, then decodes of one token each.
    for chunk in [&toks[..3], &toks[3..4], &toks[4..5], &toks[5..6]] {
        p.grow(1, chunk.len()).unwrap();
        p.advance(1, chunk.len());
        p.record(1, chunk);
    }
    let blocks = p.sequences[&1].blocks.clone();
    p.remove(1);
    p.insert_cached(2, Some(root), &blocks[..1], &toks[..4]).unwrap();
}

#[test]
fn bytes_per_block_is_keys_and_values_of_every_layer() {
    let p = pool(3);
    // 2 (k, v) × 2 layers × 2 heads × 4 dims × 4 bytes × 4 tokens.
    assert_eq!(p.bytes_per_block(), 2 * 2 * 2 * 4 * 4 * 4);
    assert_eq!(bytes_per_token(28, 8, 128, DType::BF16), 2 * 28 * 8 * 128 * 2);
}

#[test]
fn written_tokens_are_gathered_in_position_order_across_blocks() {
    let mut p = pool(4);
    p.insert(7);
    p.insert(8);
    // Interleave two sequences so their blocks are not contiguous.
    let rows = |n: usize, base: f32| {
        Tensor::arange(0f32, (n * 8) as f32, &Device::Cpu).unwrap().affine(1.0, base as f64).unwrap().reshape((n, 2, 4)).unwrap()
    };
    p.grow(7, 3).unwrap();
    p.write(0, 7, 0, &rows(3, 0.0), &rows(3, 100.0)).unwrap();
    p.advance(7, 3);
    p.grow(8, 4).unwrap();
    p.advance(8, 4);
    p.grow(7, 3).unwrap();
    p.write(0, 7, 3, &rows(3, 24.0), &rows(3, 124.0)).unwrap();
    p.advance(7, 3);
    let (k, v) = p.gather(0, 7, 6).unwrap();
    let want_k: Vec<f32> = (0..48).map(|x| x as f32).collect();
    let head_major = |t: Tensor| t.transpose(0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(head_major(k), want_k);
    let want_v: Vec<f32> = (0..48).map(|x| x as f32 + 100.0).collect();
    assert_eq!(head_major(v), want_v);
}
