//! Each family's own parts against independent references, on the tiny models of
//! `common::models`: finite-difference gradients through them and the KV-cache engine against
//! the training forward (the shared parts are `model_core.rs`'s; parity with transformers is
//! `hf_parity.rs`'s).

mod common;

use common::models::*;
use rlhf_policies::ModelConfig;

/// Qwen3: the q/k head norms' gains get gradients, and those through them are right.
#[test]
fn gradients_match_finite_differences_qwen3_head_norms() {
    let json =
        serde_json::to_string(&tiny_llama(12)).unwrap().replace(r#""model_type":"llama""#, r#""model_type":"qwen3""#);
    let cfg = ModelConfig::from_json_str(&json).unwrap();
    assert!(model(cfg.clone(), 1).params().iter().any(|(n, _)| n == "blocks.1.attn.k_norm.weight"));
    grad_check(cfg);
}

/// Mistral's window: transformers' 4096 when the config has none, no window for `null`, the
/// number given otherwise; what a config says is what it saves.
#[test]
fn mistral_windows_follow_the_config() {
    let base =
        serde_json::to_string(&tiny_llama(12)).unwrap().replace(r#""model_type":"llama""#, r#""model_type":"mistral""#);
    let windows = |json: &str| ModelConfig::from_json_str(json).unwrap().layer_windows().unwrap();
    assert_eq!(windows(&base), [Some(4096), Some(4096)]);
    let with = |w: &str| base.replacen('{', &format!(r#"{{"sliding_window":{w},"#), 1);
    assert_eq!(windows(&with("null")), [None, None]);
    assert_eq!(windows(&with("3")), [Some(3), Some(3)]);
    assert!(ModelConfig::from_json_str(&with("0")).unwrap_err().to_string().contains("sliding_window"));
    let cfg = ModelConfig::from_json_str(&with("3")).unwrap();
    assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg);
    // a window shorter than the test rows: the KV-cache engine still equals the training forward
    engine_matches_training_forward(cfg);
}

/// Gemma 3: gradients through the `1 + w` norm gains (all four per block and the head norms),
/// the GELU gate, the scaled embedding and queries, and the windowed layer's mask.
#[test]
fn gradients_match_finite_differences_gemma3() {
    let m = model(tiny_gemma3(12), 1);
    let names: Vec<String> = m.params().into_iter().map(|(n, _)| n).collect();
    for n in ["blocks.0.attn.post_norm.weight", "blocks.1.mlp.post_norm.weight", "blocks.0.attn.q_norm.weight"] {
        assert!(names.iter().any(|m| m == n), "{n}");
    }
    // a step of 1e-2 on wte moves the embedding by 4e-2 (×√16) and the tied head as well:
    // central differences there see the curvature (4% off at 1e-2; within 1% at 3e-3)
    grad_check_with(tiny_gemma3(12), 3e-3);
}

#[test]
fn kv_cache_engine_equals_full_forward_gemma3() {
    engine_matches_training_forward(tiny_gemma3(40));
}

/// OLMo 2: gradients through the post-branch norms (no pre-norms) and the q/k norms over
/// whole rows; the KV-cache engine runs the same block.
#[test]
fn gradients_match_finite_differences_and_kv_cache_olmo2() {
    let m = model(tiny_olmo2(12), 1);
    let names: Vec<String> = m.params().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n.ends_with("ln1.weight") || n.ends_with("ln2.weight")), "{names:?}");
    let widths: Vec<usize> = m.blocks[0].qk_norm.as_ref().unwrap().iter().map(|n| n.w.as_vec().len()).collect();
    assert_eq!(widths, [16, 8]);
    grad_check_with(tiny_olmo2(12), 3e-3);
    engine_matches_training_forward(tiny_olmo2(40));
}

/// Granite: gradients through its four multipliers (the embeddings', the attention scale, the
/// residual branches', the logits' inside the fused LM-head loss); the KV-cache engine applies
/// them the same way, and the head ops scale their logits as `logits` does.
#[test]
fn gradients_match_finite_differences_and_kv_cache_granite() {
    let m = model(tiny_granite(12), 1);
    let d = m.dims;
    assert_eq!((d.embed_scale, d.residual_scale, d.logit_scale), (3.0, 0.4, 0.4));
    assert!((d.query_scale - 0.7 * 2.0).abs() < 1e-6);
    grad_check_with(tiny_granite(12), 3e-3);
    engine_matches_training_forward(tiny_granite(40));
    use dfdx::prelude::*;
    let batch = rlhf_policies::Batch::unpadded(&[vec![1, 5, 2, 7, 3, 4]]).unwrap();
    let h = m.forward_hidden(&batch, NoneTape).unwrap();
    let targets = [5, 2, 7, 3, 4, 0];
    let want = m.logits(h.clone()).log_softmax::<Axis<1>>().as_vec();
    let want: Vec<f32> = want.chunks(12).zip(targets).map(|(r, t)| r[t]).collect();
    let got = m.logprobs_and_entropy(h, &targets, 1.0).as_vec();
    assert!(want.iter().zip(&got).all(|(w, g)| (w - g).abs() < 1e-5), "{want:?} vs {got:?}");
}

/// Gemma 2: gradients through both soft caps (the scores' inside the fused attention, the
/// logits' inside the fused LM-head loss) and the alternating windows; the KV-cache engine caps
/// the same way.
#[test]
fn gradients_match_finite_differences_and_kv_cache_gemma2() {
    let m = model(tiny_gemma2(12), 1);
    assert_eq!((m.dims.attn_softcap, m.dims.final_softcap), (Some(1.5), Some(2.0)));
    assert_eq!(m.blocks.iter().map(|b| b.window).collect::<Vec<_>>(), [Some(3), None]);
    assert!(m.blocks.iter().all(|b| b.qk_norm.is_none() && b.post_norms.is_some()));
    grad_check_with(tiny_gemma2(12), 3e-3);
    engine_matches_training_forward(tiny_gemma2(40));
    // the model's fused head ops cap their logits as `logits` does
    use dfdx::prelude::*;
    let batch = rlhf_policies::Batch::unpadded(&[vec![1, 5, 2, 7, 3, 4]]).unwrap();
    let h = m.forward_hidden(&batch, NoneTape).unwrap();
    let targets = [5, 2, 7, 3, 4, 0];
    let logits = m.logits(h.clone());
    assert!(logits.as_vec().iter().all(|z| z.abs() < 2.0));
    let want: Vec<f32> = logits.log_softmax::<Axis<1>>().as_vec().chunks(12).zip(targets).map(|(r, t)| r[t]).collect();
    let got = m.logprobs_and_entropy(h, &targets, 1.0).as_vec();
    assert!(want.iter().zip(&got).all(|(w, g)| (w - g).abs() < 1e-5), "{want:?} vs {got:?}");
}

/// GPT-NeoX: gradients through the parallel residual (the block's input reaching the MLP's
/// norm as well as the attention's) and through RoPE on part of each head, and the sequential
/// variant with a tied head; the KV-cache engine equals the training forward for both, and the
/// last block on kept rows equals the selected full forward.
#[test]
fn gpt_neox_gradients_engine_and_kept_rows() {
    for parallel in [true, false] {
        let cfg = tiny_neox(12, parallel);
        let d = cfg.dims().unwrap();
        assert_eq!((d.parallel_residual, d.partial_rotary, d.tied), (parallel, Some(4), !parallel));
        grad_check(cfg.clone());
        engine_matches_training_forward(tiny_neox(40, parallel));
        hidden_rows_equal_the_selected_full_forward(cfg);
    }
}
