"""Records what transformers does with an FP8 checkpoint dequantized.

Reads the FP8 checkpoint MODEL_DIR (projections in float8_e4m3fn with a `weight_scale_inv` per
block of `quantization_config.weight_block_size`, as Qwen's FP8 checkpoints ship them),
dequantizes each projection as transformers' finegrained_fp8 does (every element times its
block's scale, in float32), loads the result into the model transformers builds from the config
(float32, on CPU), and records, for the prompts of PROMPTS_JSON, the greedy tokens in OUT_JSON.

Usage: fp8_reference.py MODEL_DIR OUT_JSON PROMPTS_JSON
"""

import hashlib
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

src, out_json, prompts_json = sys.argv[1:4]
config = AutoConfig.from_pretrained(src)
bo, bi = config.quantization_config["weight_block_size"]
del config.quantization_config
weights = load_file(os.path.join(src, "model.safetensors"))
state = {}
for name, t in weights.items():
    if name.endswith("_scale_inv"):
        continue
    if t.dtype == torch.float8_e4m3fn:
        s = weights[name + "_scale_inv"].float()
        rows, cols = t.shape
        s = s.repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
        state[name] = t.float() * s
    else:
        state[name] = t.float()
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
missing, unexpected = model.load_state_dict(state, strict=False)
assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
model.tie_weights()
model.eval()
tok = AutoTokenizer.from_pretrained(src)
cases = []
for prompt in [c["prompt"] for c in json.load(open(prompts_json))["cases"]]:
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=config.eos_token_id)
    new = out.sequences[0][len(ids):].tolist()
    margins = [float(v[0] - v[1]) for v in (torch.topk(s[0], 2).values for s in out.scores)]
    cases.append({"prompt": prompt, "input_ids": ids, "new_ids": new,
                  "text": tok.decode(new, skip_special_tokens=True), "min_margin": min(margins), "margins": margins})
st = os.path.join(src, "model.safetensors")
json.dump({
    "produced_by": f"transformers {transformers.__version__}, torch {torch.__version__}, the FP8 weights dequantized "
                   f"per {bo}x{bi} block to float32 on CPU, greedy, max_new_tokens=32, stops at eos",
    "sha256": hashlib.sha256(open(st, "rb").read()).hexdigest(),
    "cases": cases,
}, open(out_json, "w"), indent=1, ensure_ascii=False)
print(f"wrote {out_json}: {len(cases)} cases, smallest margin {min(c['min_margin'] for c in cases):.4f}")
