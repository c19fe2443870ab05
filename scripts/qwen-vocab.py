"""Writes Qwen's real tokenizer (151,643 byte-level BPE tokens and Qwen3's added tokens) as a
Hugging Face tokenizer.json, from the `qwen.tiktoken` ranks the `dashscope` package ships on
PyPI, for benchmarks that need the real vocabulary where the Hub cannot be reached.

Usage: qwen-vocab.py QWEN_TIKTOKEN OUT_TOKENIZER_JSON
"""

import base64
import json
import sys

src, out = sys.argv[1:3]

# Qwen3's added tokens, by id.
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
         "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
         "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
         "<tool_response>", "</tool_response>", "<think>", "</think>"]
# Text, not special, in Qwen3's tokenizer.json.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")


def byte_chars():
    """GPT-2's map of bytes to printable characters (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


ranks = {}
for line in open(src, "rb"):
    token, rank = line.split()
    ranks[base64.b64decode(token)] = int(rank)


def split(token, rank):
    """The two tokens BPE merged into `token`: merging pairs by rank, below `rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


chars = byte_chars()
text = lambda b: "".join(chars[x] for x in b)
vocab = {text(t): r for t, r in ranks.items()}
merges = []
for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) > 1:
        pair = split(token, rank)
        assert len(pair) == 2, (token, pair)
        merges.append(f"{text(pair[0])} {text(pair[1])}")
added = [{"id": len(ranks) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": t not in NOT_SPECIAL} for i, t in enumerate(ADDED)]
tokenizer = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": added,
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]},
    "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
              "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": vocab, "merges": merges},
}
json.dump(tokenizer, open(out, "w"), ensure_ascii=False)
print(f"{out}: {len(vocab)} tokens, {len(merges)} merges, {len(added)} added", file=sys.stderr)
