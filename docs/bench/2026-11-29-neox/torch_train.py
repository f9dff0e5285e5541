import sys, time, statistics, torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPT2Config, GPT2LMHeadModel
torch.set_num_threads(2); torch.manual_seed(0)
kind = sys.argv[1]
if kind == "neox":
    cfg = GPTNeoXConfig(vocab_size=65, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                        max_position_embeddings=256, tie_word_embeddings=True, use_parallel_residual=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    model = GPTNeoXForCausalLM(cfg)
else:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=256, n_embd=384, n_layer=6, n_head=6))
model.train()
ids = torch.randint(0, 65, (8, 256))
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
times = []
for i in range(13):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward(); opt.step()
    if i >= 3: times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"{kind}: torch {torch.__version__} median step {med*1000:.0f} ms = {8*256/med:.0f} tok/s (min {min(times)*1000:.0f}, max {max(times)*1000:.0f} ms)")
