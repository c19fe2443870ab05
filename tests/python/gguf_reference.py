"""Makes a GGUF fixture and what transformers does with it.

Writes the safetensors checkpoint HF_DIR as the GGUF file OUT_GGUF with the `gguf` package (the
metadata keys, tensor names and Llama q/k row order llama.cpp's convert_hf_to_gguf.py writes; the
attention projections and the embedding in Q8_0, the MLP in Q4_0, norms in F32), then loads that
file with transformers (`gguf_file=`, which dequantizes to float32) and records, for the prompts of
PROMPTS_JSON, the ids its GGUF tokenizer gives and the greedy tokens of its model, and the ids of a
multilingual sample, in OUT_JSON.

Usage: gguf_reference.py HF_DIR OUT_GGUF OUT_JSON PROMPTS_JSON [CHAT_TEMPLATE]
"""

import hashlib
import importlib.metadata
import json
import os
import sys

import gguf
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out_gguf, out_json, prompts_json = sys.argv[1:5]
template = open(sys.argv[5]).read() if len(sys.argv) > 5 else None

config = json.load(open(os.path.join(src, "config.json")))
tokenizer_json = json.load(open(os.path.join(src, "tokenizer.json")))
arch = config["model_type"]
heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
head_dim = config.get("head_dim") or config["hidden_size"] // heads

LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(name):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, _, layer, rest = name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER[module]}.{param}"


def permute(w, n_head):
    """llama.cpp's LlamaModel.permute of q and k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


w = gguf.GGUFWriter(out_gguf, arch)
w.add_name(os.path.basename(os.path.normpath(src)))
w.add_block_count(config["num_hidden_layers"])
w.add_context_length(config["max_position_embeddings"])
w.add_embedding_length(config["hidden_size"])
w.add_feed_forward_length(config["intermediate_size"])
w.add_head_count(heads)
w.add_head_count_kv(kv_heads)
w.add_key_length(head_dim)
w.add_value_length(head_dim)
w.add_rope_dimension_count(head_dim)
w.add_rope_freq_base(config["rope_theta"])
w.add_layer_norm_rms_eps(config["rms_norm_eps"])

vocab = tokenizer_json["model"]["vocab"]
added = {t["id"]: t for t in tokenizer_json["added_tokens"]}
size = max(list(vocab.values()) + list(added)) + 1
tokens = [None] * size
for t, i in vocab.items():
    tokens[i] = t
for i, t in added.items():
    tokens[i] = t["content"]
types = [gguf.TokenType.CONTROL if i in added and added[i]["special"] else
         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL for i in range(size)]
merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
w.add_tokenizer_model("gpt2")
w.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
w.add_token_list(tokens)
w.add_token_types(types)
w.add_token_merges(merges)
w.add_bos_token_id(config["bos_token_id"])
w.add_eos_token_id(config["eos_token_id"])
w.add_add_bos_token(arch == "llama")
if template is not None:
    w.add_chat_template(template)

Q = gguf.GGMLQuantizationType
for name, t in load_file(os.path.join(src, "model.safetensors")).items():
    t = t.astype(np.float32)
    if arch == "llama" and name.endswith("q_proj.weight"):
        t = permute(t, heads)
    if arch == "llama" and name.endswith("k_proj.weight"):
        t = permute(t, kv_heads)
    if "mlp." in name:
        qtype = Q.Q4_0
    elif "self_attn." in name and name.endswith("proj.weight") or "embed_tokens" in name or name == "lm_head.weight":
        qtype = Q.Q8_0
    else:
        qtype = Q.F32
    data = t if qtype == Q.F32 else gguf.quants.quantize(t, qtype)
    w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

folder, file = os.path.split(os.path.abspath(out_gguf))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
model.eval()

cases = []
for prompt in [c["prompt"] for c in json.load(open(prompts_json))["cases"]]:
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=config["eos_token_id"])
    new = out.sequences[0][len(ids):].tolist()
    margins = []
    for s in out.scores:
        top = torch.topk(s[0], 2).values
        margins.append(float(top[0] - top[1]))
    cases.append({"prompt": prompt, "input_ids": ids, "new_ids": new,
                  "text": tok.decode(new, skip_special_tokens=True), "min_margin": min(margins), "margins": margins})

SAMPLE = [
    "Hello, world! The year 2024 had 366 days.",
    "Grüße aus München: Äpfel, Öl und Übermut.",
    "你好，世界！今天天气很好。",
    "こんにちは、世界。カタカナとひらがな。",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "emoji 🎉🚀 and  double  spaces\n\n\ttabs",
    "def f(x):\n    return x ** 2  # 1234567",
    "<|im_start|>user\nhi<|im_end|>",
]
tokenized = [{"text": t, "input_ids": tok(t)["input_ids"]} for t in SAMPLE]

GGUF_VERSION = importlib.metadata.version("gguf")
json.dump({
    "produced_by": f"transformers {transformers.__version__}, gguf {GGUF_VERSION}, "
                   f"torch {torch.__version__}, float32 on CPU (gguf_file=, dequantized), greedy, max_new_tokens=32, stops at eos",
    "file": os.path.basename(out_gguf),
    "sha256": hashlib.sha256(open(out_gguf, "rb").read()).hexdigest(),
    "cases": cases,
    "tokenized": tokenized,
}, open(out_json, "w"), indent=1, ensure_ascii=False)
print(f"wrote {out_gguf} ({os.path.getsize(out_gguf)} bytes) and {out_json}")
