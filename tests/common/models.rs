//! Tiny models of each family and the checks the model tests run on any of them: finite-difference
//! gradients, the KV-cache engine against the training forward, the last block on kept rows.

use dfdx::prelude::*;
use rlhf_policies::config::{Gpt2Config, LlamaConfig};
use rlhf_policies::params::ParamMut;
use rlhf_policies::{Batch, CausalLm, InferenceModel, KvCache, LogitsAt, ModelConfig};

use super::max_abs_diff;

pub fn tiny_gpt2(vocab: usize) -> ModelConfig {
    ModelConfig::gpt2_preset(vocab, 16, 2, 2, 32)
}

/// The tiny GPT-2 with one field of its config changed.
pub fn tiny_gpt2_with(vocab: usize, change: impl FnOnce(&mut Gpt2Config)) -> ModelConfig {
    let mut cfg = tiny_gpt2(vocab);
    let ModelConfig::Gpt2(c) = &mut cfg else { unreachable!() };
    change(c);
    cfg
}

/// GPT-2 with the exact (erf) GELU: transformers' `activation_function: "gelu"`.
pub fn tiny_gpt2_erf(vocab: usize) -> ModelConfig {
    tiny_gpt2_with(vocab, |c| c.activation_function = "gelu".into())
}

/// GPT-2 without biases (nanoGPT's `bias = False`).
pub fn tiny_gpt2_no_bias(vocab: usize) -> ModelConfig {
    tiny_gpt2_with(vocab, |c| c.bias = false)
}

pub fn tiny_llama(vocab: usize) -> ModelConfig {
    let json = format!(
        r#"{{"model_type":"llama","vocab_size":{vocab},"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":4,
            "rms_norm_eps":1e-5,"rope_theta":500.0,"max_position_embeddings":64,"tie_word_embeddings":false}}"#
    );
    let cfg = ModelConfig::from_json_str(&json).unwrap();
    assert!(matches!(cfg, ModelConfig::Llama(LlamaConfig { .. })));
    cfg
}

/// Gemma 3 with a window (3) shorter than the test batches, a local RoPE base, a head width
/// apart from d / heads and `query_pre_attn_scalar` apart from it.
pub fn tiny_gemma3(vocab: usize) -> ModelConfig {
    let json = format!(
        r#"{{"model_type":"gemma3_text","vocab_size":{vocab},"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":6,
            "query_pre_attn_scalar":5,"sliding_window":3,"layer_types":["sliding_attention","full_attention"],
            "rope_theta":500.0,"rope_local_base_freq":50.0,"max_position_embeddings":64}}"#
    );
    ModelConfig::from_json_str(&json).unwrap()
}

/// Gemma 2 with a window (3) shorter than the test batches on its first layer, a head width
/// apart from d / heads, and soft caps tight enough (1.5 on the scores, 2 on the logits) that
/// the model's init bends most values through them.
pub fn tiny_gemma2(vocab: usize) -> ModelConfig {
    let json = format!(
        r#"{{"model_type":"gemma2","vocab_size":{vocab},"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":6,
            "query_pre_attn_scalar":5,"sliding_window":3,"rope_theta":500.0,"max_position_embeddings":64,
            "attn_logit_softcapping":1.5,"final_logit_softcapping":2.0}}"#
    );
    ModelConfig::from_json_str(&json).unwrap()
}

/// Granite with every multiplier away from 1 (the attention's 0.7 against 1/√4 = 0.5).
pub fn tiny_granite(vocab: usize) -> ModelConfig {
    let json = format!(
        r#"{{"model_type":"granite","vocab_size":{vocab},"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rope_theta":500.0,
            "max_position_embeddings":64,"tie_word_embeddings":true,"embedding_multiplier":3.0,
            "attention_multiplier":0.7,"residual_multiplier":0.4,"logits_scaling":2.5}}"#
    );
    ModelConfig::from_json_str(&json).unwrap()
}

/// OLMo 2: norms on the branches' outputs only, q/k norms over whole rows, grouped-query
/// attention (so the two norms differ in width), an untied head.
pub fn tiny_olmo2(vocab: usize) -> ModelConfig {
    let json = format!(
        r#"{{"model_type":"olmo2","vocab_size":{vocab},"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rope_theta":500.0,
            "max_position_embeddings":64}}"#
    );
    ModelConfig::from_json_str(&json).unwrap()
}

/// GPT-NeoX with RoPE on half of each head (4 of 8 dimensions) and, with `parallel`, Pythia's
/// parallel residual; without it the sequential block and a tied head.
pub fn tiny_neox(vocab: usize, parallel: bool) -> ModelConfig {
    let json = format!(
        r#"{{"model_type":"gpt_neox","vocab_size":{vocab},"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":2,"rotary_pct":0.5,"rotary_emb_base":500,
            "max_position_embeddings":64,"use_parallel_residual":{parallel},"tie_word_embeddings":{tied}}}"#,
        tied = !parallel
    );
    ModelConfig::from_json_str(&json).unwrap()
}

/// Random init with a larger std, so logits are far from uniform and greedy is non-degenerate.
pub fn model(cfg: ModelConfig, seed: u64) -> CausalLm<Cpu> {
    let mut cfg = cfg;
    match &mut cfg {
        ModelConfig::Gpt2(c) => c.initializer_range = 0.3,
        ModelConfig::Llama(c)
        | ModelConfig::Qwen2(c)
        | ModelConfig::Qwen3(c)
        | ModelConfig::Mistral(c)
        | ModelConfig::Phi3(c)
        | ModelConfig::Smollm3(c)
        | ModelConfig::Granite(c)
        | ModelConfig::Olmo2(c) => c.initializer_range = 0.3,
        ModelConfig::Gemma2(c) => c.initializer_range = 0.3,
        ModelConfig::Gemma3Text(c) => c.initializer_range = 0.3,
        ModelConfig::GptNeox(c) => c.initializer_range = 0.3,
        ModelConfig::Olmo3(c) => c.set("initializer_range", 0.3.into()).unwrap(),
    }
    CausalLm::new(cfg, &Cpu::default(), seed).unwrap()
}

/// Mean next-token cross-entropy over the real positions of a right-padded batch.
pub fn loss_value(m: &CausalLm<Cpu>, batch: &Batch, targets: &[usize], weights: &[f32]) -> f32 {
    let dev = Cpu::default();
    let logits = m.forward(batch, NoneTape).unwrap();
    let n = targets.len();
    let lp = logits.log_softmax::<Axis<1>>().select(dev.tensor_from_vec(targets.to_vec(), (n,)));
    -(lp * dev.tensor_from_vec(weights.to_vec(), (n,))).sum::<Rank0, _>().array()
}

pub fn grad_check(cfg: ModelConfig) {
    grad_check_with(cfg, 1e-2)
}

/// The gradient checks' right-padded batch, with next-token targets at real positions (weight
/// 1/8 each; 0 on pads and on each row's last token).
pub fn grad_check_batch() -> (Batch, Vec<usize>, Vec<f32>) {
    let batch = Batch::right_padded(&[vec![1, 5, 2, 7, 3, 4], vec![6, 2, 9, 1]], 0).unwrap();
    let (mut targets, mut weights) = (vec![], vec![]);
    for r in 0..batch.b {
        for j in 0..batch.t {
            let next_real = j + 1 < batch.t && batch.is_real(r, j + 1);
            targets.push(if next_real { batch.ids[r * batch.t + j + 1] as usize } else { 0 });
            weights.push(if next_real { 1.0 / 8.0 } else { 0.0 });
        }
    }
    (batch, targets, weights)
}

/// Central differences with step `eps` against the tape's gradient, three entries per tensor.
pub fn grad_check_with(cfg: ModelConfig, eps: f32) {
    let dev = Cpu::default();
    let m = model(cfg, 3);
    let (batch, targets, weights) = grad_check_batch();
    let n = targets.len();
    let logits = m.forward(&batch, OwnedTape::<f32, Cpu>::default()).unwrap();
    let lp = logits.log_softmax::<Axis<1>>().select(dev.tensor_from_vec(targets.clone(), (n,)));
    let loss = (lp * dev.tensor_from_vec(weights.clone(), (n,))).sum::<Rank0, _>().negate();
    let grads = loss.backward();
    let base = m.clone();
    let mut checked = 0;
    for (pi, (name, p)) in base.params().into_iter().enumerate() {
        let analytic = match p {
            rlhf_policies::ParamRef::V(t) => grads.get(t).as_vec(),
            rlhf_policies::ParamRef::M(t) => grads.get(t).as_vec(),
        };
        // three entries per tensor, spread over it
        for k in 0..3 {
            let idx = (k * 7919 + pi * 31) % analytic.len();

            let f = |delta: f32| {
                let mut mm = base.clone();
                let (_, q) = mm.params_mut().into_iter().nth(pi).unwrap();
                match q {
                    ParamMut::V(t) => {
                        let mut v = t.as_vec();
                        v[idx] += delta;
                        *t = dev.tensor_from_vec(v, *t.shape());
                    }
                    ParamMut::M(t) => {
                        let mut v = t.as_vec();
                        v[idx] += delta;
                        *t = dev.tensor_from_vec(v, *t.shape());
                    }
                }
                loss_value(&mm, &batch, &targets, &weights) as f64
            };
            let fd = ((f(eps) - f(-eps)) / (2.0 * eps as f64)) as f32;
            let g = analytic[idx];
            assert!((fd - g).abs() <= 2e-3 + 3e-2 * g.abs(), "{name}[{idx}]: analytic {g} vs finite difference {fd}");
            checked += 1;
        }
    }
    assert!(checked > 30);
}

pub fn engine_matches_training_forward(cfg: ModelConfig) {
    let m = model(cfg, 5);
    let engine = InferenceModel::from_model(&m);
    let v = m.dims.vocab;
    let rows = vec![vec![3u32, 1, 4, 1, 5, 9, 2, 6], vec![5, 3, 5], vec![8, 9, 7, 9, 3]];
    let batch = Batch::left_padded(&rows, 0).unwrap();
    let want = m.forward(&batch, NoneTape).unwrap().as_vec();
    // prefill over the whole padded batch
    let pad: Vec<usize> = rows.iter().map(|r| batch.t - r.len()).collect();
    let mut cache = KvCache::new(&m.dims, pad.clone(), batch.t);
    let got = engine.forward(&mut cache, &batch.ids, batch.t, LogitsAt::All).unwrap();
    for (r, &p) in pad.iter().enumerate() {
        let real = (p * v..batch.t * v).map(|i| r * batch.t * v + i);
        let (a, b): (Vec<f32>, Vec<f32>) = real.map(|i| (got[i], want[i])).unzip();
        assert!(max_abs_diff(&a, &b) < 1e-5, "prefill row {r}");
    }
    // prefill 2 columns, then one column at a time
    let mut cache = KvCache::new(&m.dims, pad.clone(), batch.t);
    let col = |j: usize| (0..rows.len()).map(|r| batch.ids[r * batch.t + j]).collect::<Vec<u32>>();
    let two: Vec<u32> = (0..rows.len()).flat_map(|r| batch.ids[r * batch.t..r * batch.t + 2].to_vec()).collect();
    engine.forward(&mut cache, &two, 2, LogitsAt::Last).unwrap();
    for j in 2..batch.t {
        let got = engine.forward(&mut cache, &col(j), 1, LogitsAt::Last).unwrap();
        for r in 0..rows.len() {
            if j < pad[r] {
                continue;
            }
            let w = &want[(r * batch.t + j) * v..(r * batch.t + j + 1) * v];
            assert!(max_abs_diff(&got[r * v..(r + 1) * v], w) < 1e-5, "step {j} row {r}");
        }
    }
}

/// `forward_hidden_rows` (the last block on the kept rows only) against the full forward
/// followed by a row selection: the same values and the same gradient for every parameter, on
/// a left-padded batch with rows out of order; a row past the batch is an error.
pub fn hidden_rows_equal_the_selected_full_forward(cfg: ModelConfig) {
    let dev = Cpu::default();
    let m = model(cfg, 5);
    let batch = Batch::left_padded(&[vec![1, 5, 2, 7, 3, 4], vec![6, 2, 9, 1]], 0).unwrap();
    let rows = [11, 3, 4, 9, 10, 5];
    let c = m.dims.d_model;
    let up = dev
        .tensor_from_vec((0..rows.len() * c).map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5).collect(), (rows.len(), c));
    let run = |pruned: bool| {
        let tape = OwnedTape::<f32, Cpu>::default();
        let h = if pruned {
            m.forward_hidden_rows(&batch, &rows, tape).unwrap()
        } else {
            let idx = dev.tensor_from_vec(rows.to_vec(), (rows.len(),));
            m.forward_hidden(&batch, tape).unwrap().gather(idx)
        };
        let values = h.retaped::<NoneTape>().as_vec();
        let g = (h * up.clone()).sum::<Rank0, _>().backward();
        let grads: Vec<Vec<f32>> = m
            .params()
            .into_iter()
            .filter(|(name, _)| !name.starts_with("lm_head")) // an untied head is not in the hidden states
            .map(|(_, p)| match p {
                rlhf_policies::ParamRef::V(t) => g.get(t).as_vec(),
                rlhf_policies::ParamRef::M(t) => g.get(t).as_vec(),
            })
            .collect();
        (values, grads)
    };
    let ((vp, gp), (vf, gf)) = (run(true), run(false));
    assert!(max_abs_diff(&vp, &vf) < 1e-5, "values differ by {}", max_abs_diff(&vp, &vf));
    let names = m.params().into_iter().map(|(n, _)| n).filter(|n| !n.starts_with("lm_head"));
    for (name, (a, b)) in names.zip(gp.iter().zip(&gf)) {
        assert!(max_abs_diff(a, b) < 1e-5, "d{name} differs by {}", max_abs_diff(a, b));
    }
    let err = m.forward_hidden_rows(&batch, &[12], NoneTape).unwrap_err().to_string();
    assert!(err.contains("row 12"), "{err}");
}
