# HF ReformerModelWithLMHead on the WordNet corpus for a fixed wall-clock time,
# the recipe of configs/wordnet.yaml: 6 layers, d 512, 8 heads (64 wide), d_ff
# 2048, 16K bytes, attn_layers local/lsh alternating, 4 hashes, chunk 64,
# axial (128,128) x (256,256) with std 1.0, AdamW 1e-3 (0.9, 0.98, eps 1e-9),
# 500 warm-up steps then rsqrt decay, clip 1.0, batch 1, no dropout.
# Eval: bpc over N held-out windows (the last 5% of the file), every 200 steps
# and at the end (bench/RESULTS.md, 2026-11-30).  usage: hf_race.py CORPUS SECONDS OUT.jsonl [KINDS] [EVAL_N]
import sys, time, json, math, numpy as np, torch
t_start = time.time()
torch.backends.cuda.matmul.allow_tf32 = True
from transformers import ReformerConfig, ReformerModelWithLMHead
path, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
kinds = (sys.argv[4] if len(sys.argv) > 4 else 'local,lsh').split(',')
n_eval = int(sys.argv[5]) if len(sys.argv) > 5 else 16
L, NL, warm, peak = 16384, 6, 500, 1e-3
data = np.fromfile(path, dtype=np.uint8)
nv = int(len(data) * 0.05); train, valid = data[:len(data) - nv], data[len(data) - nv:]
torch.manual_seed(1)
cfg = ReformerConfig(vocab_size=256, hidden_size=512, num_attention_heads=8, attention_head_size=64,
    feed_forward_size=2048, attn_layers=[kinds[i % len(kinds)] for i in range(NL)], num_hashes=4,
    lsh_attn_chunk_length=64, local_attn_chunk_length=64, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
    local_num_chunks_before=1, local_num_chunks_after=0, is_decoder=True, axial_pos_embds=True,
    axial_pos_shape=(128, 128), axial_pos_embds_dim=(256, 256), axial_norm_std=1.0, initializer_range=0.02,
    max_position_embeddings=L, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0, hidden_act='gelu_new', layer_norm_eps=1e-6,
    chunk_size_feed_forward=0, num_buckets=None, tie_word_embeddings=False)
m = ReformerModelWithLMHead(cfg).cuda().train()
opt = torch.optim.AdamW(m.parameters(), lr=peak, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)
rng = np.random.default_rng(1)
starts = np.linspace(0, len(valid) - L - 1, n_eval).astype(np.int64)
f = open(out, 'w')
def log(d):
    d['elapsed_s'] = round(time.time() - t_start, 2); f.write(json.dumps(d) + '\n'); f.flush(); print(json.dumps(d), flush=True)
def evaluate(step):
    m.eval(); tot = 0.0
    with torch.no_grad():
        for s in starts:
            ids = torch.from_numpy(valid[s:s + L].astype(np.int64)).cuda()[None]
            tot += m(input_ids=ids, labels=ids).loss.item()
    m.train(); log(dict(step=step, eval=True, eval_bpc=tot / n_eval / math.log(2)))
step = 0
while time.time() - t_start < seconds:
    step += 1
    for g in opt.param_groups:
        g['lr'] = peak * min(1.0, step / warm) * math.sqrt(warm / max(step, warm))
    s = int(rng.integers(0, len(train) - L - 1))
    ids = torch.from_numpy(train[s:s + L].astype(np.int64)).cuda()[None]
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
    if step % 50 == 0: log(dict(step=step, loss=loss.item(), bpc=loss.item() / math.log(2)))
    if step % 200 == 0: evaluate(step)
evaluate(step)
