//! The transformer against independent references: finite-difference gradients, the tape-free
//! KV-cache engine against the training forward, and the frozen copy under an optimizer step
//! (GPT-2 and Llama here; the other families' own parts in `model_families.rs`).

mod common;

use common::max_abs_diff;
use common::models::*;
use dfdx::prelude::*;
use rlhf_policies::params::ParamRef;
use rlhf_policies::sampling::argmax;
use rlhf_policies::{
    clip_grad_norm, generate, AdamW, AdamWConfig, Batch, CausalLm, InferenceModel, KvCache, LogitsAt, ModelConfig,
    SamplingConfig,
};

#[test]
fn gradients_match_finite_differences_gpt2() {
    grad_check(tiny_gpt2(12));
}

#[test]
fn gradients_match_finite_differences_gpt2_exact_gelu() {
    grad_check(tiny_gpt2_erf(12));
}

#[test]
fn gradients_match_finite_differences_gpt2_without_biases() {
    grad_check(tiny_gpt2_no_bias(12));
}

#[test]
fn bias_free_gpt2_has_no_bias_parameters_and_says_so_in_its_config() {
    let m = model(tiny_gpt2_no_bias(12), 1);
    let names: Vec<String> = m.params().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| !n.ends_with(".bias")), "{names:?}");
    assert_eq!(names.len(), 2 + 2 * 8 + 1, "wte, wpe, 8 weights per block, ln_f");
    let json = serde_json::to_value(&m.config).unwrap();
    assert_eq!(json["bias"], false);
    // the default stays out of config.json, as transformers writes it
    let json = serde_json::to_value(tiny_gpt2(12)).unwrap();
    assert!(json.get("bias").is_none());
}

#[test]
fn gradients_match_finite_differences_llama_gqa() {
    grad_check(tiny_llama(12));
}

#[test]
fn kv_cache_engine_equals_full_forward_gpt2() {
    engine_matches_training_forward(tiny_gpt2(40));
}

#[test]
fn kv_cache_engine_equals_full_forward_gpt2_exact_gelu() {
    engine_matches_training_forward(tiny_gpt2_erf(40));
}

#[test]
fn kv_cache_engine_equals_full_forward_gpt2_without_biases() {
    engine_matches_training_forward(tiny_gpt2_no_bias(40));
}

#[test]
fn kv_cache_engine_equals_full_forward_llama() {
    engine_matches_training_forward(tiny_llama(40));
}

#[test]
fn hidden_rows_equal_the_selected_full_forward_gpt2() {
    hidden_rows_equal_the_selected_full_forward(tiny_gpt2(12));
    hidden_rows_equal_the_selected_full_forward(tiny_gpt2_no_bias(12));
}

#[test]
fn hidden_rows_equal_the_selected_full_forward_llama() {
    hidden_rows_equal_the_selected_full_forward(tiny_llama(12));
}

/// `distinct_min`: tied random GPT-2 models repeat their input (see the fixtures README), so
/// only the untied Llama is asked for a varied continuation.
fn greedy_equals_reforward_loop(cfg: ModelConfig, distinct_min: usize) {
    let m = model(cfg, 9);
    let engine = InferenceModel::from_model(&m);
    let prompts = vec![vec![1u32, 2, 3], vec![7, 8, 9, 10, 11]];
    let n_new = 12;
    let out =
        generate(&engine, &prompts, 0, &SamplingConfig { greedy: true, max_new_tokens: n_new, ..Default::default() })
            .unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let mut seq = p.clone();
        for _ in 0..n_new {
            let logits = m.forward(&Batch::unpadded(&[seq.clone()]).unwrap(), NoneTape).unwrap().as_vec();
            let v = m.dims.vocab;
            let (id, _) = argmax(&logits[(seq.len() - 1) * v..]);
            seq.push(id as u32);
        }
        assert_eq!(out.tokens[r], seq[p.len()..], "row {r}");
        let distinct = out.tokens[r].iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct >= distinct_min, "row {r}: only {distinct} distinct tokens");
    }
}

#[test]
fn greedy_kv_cache_equals_reforward_gpt2() {
    greedy_equals_reforward_loop(tiny_gpt2(40), 1);
}

#[test]
fn greedy_kv_cache_equals_reforward_llama() {
    greedy_equals_reforward_loop(tiny_llama(40), 4);
}

#[test]
fn frozen_copy_is_unchanged_by_an_optimizer_step() {
    let dev = Cpu::default();
    let mut policy = model(tiny_gpt2(20), 1);
    let reference = policy.frozen_copy();
    for ((n, a), (_, b)) in policy.params().iter().zip(reference.params().iter()) {
        let (ia, ib) = match (a, b) {
            (rlhf_policies::ParamRef::V(a), rlhf_policies::ParamRef::V(b)) => {
                (rlhf_policies::params::tensor_id(*a), rlhf_policies::params::tensor_id(*b))
            }
            (rlhf_policies::ParamRef::M(a), rlhf_policies::ParamRef::M(b)) => {
                (rlhf_policies::params::tensor_id(*a), rlhf_policies::params::tensor_id(*b))
            }
            _ => panic!("walkers disagree at {n}"),
        };
        assert_ne!(ia, ib, "{n} shares its id with the reference");
    }
    let batch = Batch::unpadded(&[vec![1, 2, 3, 4, 5, 6]]).unwrap();
    let before_ref = reference.forward(&batch, NoneTape).unwrap().as_vec();
    let before_pol = policy.forward(&batch, NoneTape).unwrap().as_vec();
    // a PPO-like loss: policy log-probs (taped) minus reference log-probs (untaped constant)
    let targets = dev.tensor_from_vec(vec![2usize, 3, 4, 5, 6, 7], (6,));
    let lp = policy
        .forward(&batch, OwnedTape::<f32, Cpu>::default())
        .unwrap()
        .log_softmax::<Axis<1>>()
        .select(targets.clone());
    let ref_lp = reference.forward(&batch, NoneTape).unwrap().log_softmax::<Axis<1>>().select(targets);
    let loss = (lp - ref_lp).mean();
    let mut grads = loss.backward();
    let norm = clip_grad_norm(&policy.params(), &mut grads, 1.0).unwrap();
    assert!(norm > 0.0);
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, ..Default::default() });
    opt.step(policy.params_mut(), &mut grads, 1e-2).unwrap();
    let after_ref = reference.forward(&batch, NoneTape).unwrap().as_vec();
    let after_pol = policy.forward(&batch, NoneTape).unwrap().as_vec();
    assert_eq!(before_ref, after_ref, "the frozen reference moved");
    assert!(max_abs_diff(&before_pol, &after_pol) > 1e-3, "the policy did not move");
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let dev = Cpu::default();
    let m = model(tiny_gpt2(20), 2);
    let batch = Batch::unpadded(&[vec![1, 2, 3, 4]]).unwrap();
    let loss = m.forward(&batch, OwnedTape::<f32, Cpu>::default()).unwrap().square().sum::<Rank0, _>();
    let mut grads = loss.backward();
    let params = m.params();
    let before = clip_grad_norm(&params, &mut grads, 1e-3).unwrap();
    assert!(before > 1e-3);
    let after = clip_grad_norm(&params, &mut grads, f64::INFINITY).unwrap();
    assert!((after - 1e-3).abs() < 1e-7, "norm after clipping {after}");
    let _ = dev;
}

#[test]
fn adamw_excludes_1d_params_from_weight_decay() {
    // with a zero gradient, AdamW's only effect is decoupled decay: w ← w·(1 − lr·λ)
    let mut m = model(tiny_gpt2(20), 4);
    let before: Vec<(String, Vec<f32>)> = m.params().iter().map(|(n, p)| (n.clone(), p.to_vec())).collect();
    let mut grads = Gradients::leaky();
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.5, no_decay_1d: true, ..Default::default() });
    opt.step(m.params_mut(), &mut grads, 0.1).unwrap();
    for ((name, old), (_, p)) in before.iter().zip(m.params()) {
        let new = p.to_vec();
        let factor = if p.shape().len() == 1 { 1.0 } else { 1.0 - 0.1 * 0.5 };
        for (a, b) in old.iter().zip(&new) {
            assert!((a * factor - b).abs() < 1e-6, "{name}: {a}·{factor} vs {b}");
        }
    }
}

/// Two AdamW steps with the same gradient g follow the closed form on every element of every
/// parameter: m̂ = g and v̂ = g² at both steps, so p ← p − lr·(g/(|g| + ε) + λ·p) twice (λ = 0
/// for 1-D parameters). The updates run in parallel over parameters; a moment or gradient
/// handed to the wrong parameter, or a moment not kept for the second step, breaks the form.
#[test]
fn two_adamw_steps_follow_the_closed_form_on_every_parameter() {
    let m0 = model(tiny_gpt2(20), 5);
    let batch = Batch::unpadded(&[vec![1, 2, 3, 4, 5]]).unwrap();
    let loss = m0.forward(&batch, OwnedTape::<f32, Cpu>::default()).unwrap().square().mean();
    let mut grads = loss.backward();
    let g: Vec<Vec<f32>> = m0
        .params()
        .iter()
        .map(|(_, p)| match p {
            ParamRef::V(t) => grads.get(*t).as_vec(),
            ParamRef::M(t) => grads.get(*t).as_vec(),
        })
        .collect();
    let mut m = m0.clone();
    let (lr, wd, eps) = (0.01f64, 0.1f64, 1e-8f64);
    let mut opt = AdamW::new(AdamWConfig { lr, weight_decay: wd, eps, no_decay_1d: true, ..Default::default() });
    opt.step(m.params_mut(), &mut grads, lr).unwrap();
    opt.step(m.params_mut(), &mut grads, lr).unwrap();
    for (((name, p0), (_, p2)), g) in m0.params().iter().zip(m.params()).zip(&g) {
        let lambda = if p0.shape().len() == 1 { 0.0 } else { wd };
        for ((&a, &b), &g) in p0.to_vec().iter().zip(&p2.to_vec()).zip(g) {
            let (g, mut want) = (g as f64, a as f64);
            for _ in 0..2 {
                want -= lr * (g / (g.abs() + eps) + lambda * want);
            }
            assert!((want - b as f64).abs() < 1e-6, "{name}: {b} against the closed form {want}");
        }
    }
}

/// A parameter given no rate sits a step out: it and its moments stay, and its own step count
/// does not advance, so its first real step is Adam's first step (p − lr·(g/(|g| + ε) + λ·p))
/// however many steps the others took; the counts survive a save and load, and a bad one is
/// an error naming it.
#[test]
fn a_parameter_sitting_steps_out_keeps_its_own_step_count() {
    let m0 = model(tiny_gpt2(20), 6);
    let batch = Batch::unpadded(&[vec![1, 2, 3, 4, 5]]).unwrap();
    let mut grads = m0.forward(&batch, OwnedTape::<f32, Cpu>::default()).unwrap().square().mean().backward();
    let (lr, wd, eps) = (0.01f64, 0.1f64, 1e-8f64);
    let cfg = AdamWConfig { lr, weight_decay: wd, eps, ..Default::default() };
    let (mut m, mut opt) = (m0.clone(), AdamW::new(cfg.clone()));
    let waits = |name: &str| name.starts_with("blocks.0.");
    for _ in 0..3 {
        opt.step_with(m.params_mut(), &mut grads, |n| (!waits(n)).then_some(lr)).unwrap();
    }
    let (t, state) = opt.state(&m.params()).unwrap();
    let mut waited = 0;
    for ((name, p0), (_, p)) in m0.params().iter().zip(m.params()) {
        if waits(name) {
            assert_eq!(p0.to_vec(), p.to_vec(), "{name} sat out");
            assert!(state[&format!("exp_avg.{name}")].data.iter().all(|&x| x == 0.0), "{name}'s moments untouched");
            assert_eq!(state[&format!("step.{name}")].data, [0.0], "{name} took no step");
            waited += 1;
        } else {
            assert!(!state.contains_key(&format!("step.{name}")), "{name} took every step");
        }
    }
    assert!(t == 3 && waited > 3, "{t} steps, {waited} parameters waiting");
    // its first step, from a state saved and loaded
    let file = std::path::Path::new("optimizer.safetensors");
    let mut loaded = AdamW::new(cfg.clone());
    loaded.load_state(&m.params(), t, &state, file).unwrap();
    let before = m.clone();
    loaded.step(m.params_mut(), &mut grads, lr).unwrap();
    for (((name, p0), (_, p1)), (_, gp)) in
        before.params().iter().zip(m.params()).zip(m0.params()).filter(|x| waits(&x.0 .0 .0))
    {
        let g = match gp {
            ParamRef::V(t) => grads.get(t).as_vec(),
            ParamRef::M(t) => grads.get(t).as_vec(),
        };
        let lambda = if p0.shape().len() == 1 { 0.0 } else { wd };
        for ((&a, &b), &g) in p0.to_vec().iter().zip(&p1.to_vec()).zip(&g) {
            let want = a as f64 - lr * (g as f64 / ((g as f64).abs() + eps) + lambda * a as f64);
            assert!((want - b as f64).abs() < 1e-6, "{name}: {b} against Adam's first step {want}");
        }
    }
    for (key, data, says) in
        [("step.blocks.0.ln1.weight", vec![4.0], "0..=3"), ("step.nothing", vec![1.0], "no parameter")]
    {
        let mut bad = state.clone();
        bad.insert(key.into(), rlhf_policies::checkpoint::HostTensor { shape: vec![1], data });
        let e = AdamW::new(cfg.clone()).load_state(&m.params(), t, &bad, file).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(says) && e.contains("optimizer.safetensors"), "{e}");
    }
}

/// Rows of one cache advance and restart independently (what a vector env with auto-reset
/// needs), and each row's logits equal the training forward of its own sequence.
#[test]
fn kv_cache_rows_advance_and_reset_independently() {
    for cfg in [tiny_gpt2(40), tiny_llama(40)] {
        let m = model(cfg, 21);
        let engine = InferenceModel::from_model(&m);
        let v = m.dims.vocab;
        let last_logits = |seq: &[u32]| {
            let l = m.forward(&Batch::unpadded(&[seq.to_vec()]).unwrap(), NoneTape).unwrap().as_vec();
            l[(seq.len() - 1) * v..].to_vec()
        };
        let mut cache = KvCache::new(&m.dims, vec![0, 0, 0], 16);
        let (a, b) = (vec![1u32, 2, 3, 4, 5], vec![9u32, 8]);
        engine.forward_rows(&mut cache, &[0], &a, a.len(), LogitsAt::Last).unwrap();
        engine.forward_rows(&mut cache, &[2], &b, b.len(), LogitsAt::Last).unwrap();
        assert_eq!((cache.len(0), cache.len(1), cache.len(2)), (5, 0, 2));
        // one more token for rows 2 and 0 (in that order)
        let out = engine.forward_rows(&mut cache, &[2, 0], &[7, 6], 1, LogitsAt::Last).unwrap();
        assert!(max_abs_diff(&out[..v], &last_logits(&[9, 8, 7])) < 1e-5);
        assert!(max_abs_diff(&out[v..], &last_logits(&[1, 2, 3, 4, 5, 6])) < 1e-5);
        // restart row 0 on a new sequence while row 2 keeps going
        cache.reset_row(0, 0);
        let c = vec![4u32, 4, 2];
        let out0 = engine.forward_rows(&mut cache, &[0], &c, 3, LogitsAt::Last).unwrap();
        assert!(max_abs_diff(&out0, &last_logits(&c)) < 1e-5);
        let out = engine.forward_rows(&mut cache, &[0, 2], &[1, 1], 1, LogitsAt::Last).unwrap();
        assert!(max_abs_diff(&out[..v], &last_logits(&[4, 4, 2, 1])) < 1e-5);
        assert!(max_abs_diff(&out[v..], &last_logits(&[9, 8, 7, 1])) < 1e-5);
        // bad row lists are errors
        assert!(engine.forward_rows(&mut cache, &[0, 0], &[1, 1], 1, LogitsAt::Last).is_err());
        assert!(engine.forward_rows(&mut cache, &[3], &[1], 1, LogitsAt::Last).is_err());
    }
}

/// Saving the model and the AdamW state mid-training and resuming from them continues exactly
/// as the uninterrupted run (bit for bit).
#[test]
fn adamw_state_round_trip_gives_exact_resume() {
    use rlhf_policies::checkpoint::{read_safetensors, write_safetensors};
    let dev = Cpu::default();
    let batch = Batch::unpadded(&[vec![1, 2, 3, 4, 5, 6], vec![6, 5, 4, 3, 2, 1]]).unwrap();
    let targets = dev.tensor_from_vec(vec![2usize, 3, 4, 5, 6, 7, 4, 3, 2, 1, 0, 1], (12,));
    let step = |m: &mut CausalLm<Cpu>, opt: &mut AdamW<Cpu>| {
        let loss = m
            .forward(&batch, OwnedTape::<f32, Cpu>::default())
            .unwrap()
            .log_softmax::<Axis<1>>()
            .select(targets.clone())
            .mean()
            .negate();
        let mut grads = loss.backward();
        clip_grad_norm(&m.params(), &mut grads, 0.5).unwrap();
        opt.step(m.params_mut(), &mut grads, 3e-3).unwrap();
    };
    let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let mut m = model(tiny_gpt2(12), 8);
    let mut opt = AdamW::new(cfg.clone());
    for _ in 0..3 {
        step(&mut m, &mut opt);
    }
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path(), None).unwrap();
    let (t, state) = opt.state(&m.params()).unwrap();
    write_safetensors(&dir.path().join("optimizer.safetensors"), &state).unwrap();
    for _ in 0..2 {
        step(&mut m, &mut opt);
    }
    let want = m.forward(&batch, NoneTape).unwrap().as_vec();

    let mut m2 = CausalLm::load_pretrained(dir.path(), &dev).unwrap();
    let mut opt2 = AdamW::new(cfg);
    let file = dir.path().join("optimizer.safetensors");
    opt2.load_state(&m2.params(), t, &read_safetensors(&file).unwrap(), &file).unwrap();
    for _ in 0..2 {
        step(&mut m2, &mut opt2);
    }
    assert_eq!(m2.forward(&batch, NoneTape).unwrap().as_vec(), want);
    // a missing moment is an error naming it
    let mut partial = read_safetensors(&file).unwrap();
    partial.remove("exp_avg.wte");
    let e =
        AdamW::<Cpu>::new(AdamWConfig::default()).load_state(&m2.params(), t, &partial, &file).unwrap_err().to_string();
    assert!(e.contains("exp_avg.wte") && e.contains("optimizer.safetensors"), "{e}");
    // a frozen parameter needs none, and one there (older checkpoints kept zeros) is ignored
    let frozen = AdamWConfig { freeze: vec!["wte".into()], ..AdamWConfig::default() };
    AdamW::<Cpu>::new(frozen.clone()).load_state(&m2.params(), t, &partial, &file).unwrap();
    let mut opt3 = AdamW::<Cpu>::new(frozen);
    opt3.load_state(&m2.params(), t, &read_safetensors(&file).unwrap(), &file).unwrap();
    let (_, saved) = opt3.state(&m2.params()).unwrap();
    assert!(!saved.contains_key("exp_avg.wte") && !saved.contains_key("exp_avg_sq.wte"), "none saved either");
    assert_eq!(saved.len() + 2, state.len(), "every other moment is");
}

/// A packed row gives each of its sequences the logits that sequence has alone (attention and
/// positions restart at each), for learned positions and RoPE alike.
fn packed_rows_equal_separate_sequences(cfg: ModelConfig) {
    let m = model(cfg, 21);
    let (s1, s2, s3, s4): (&[u32], &[u32], &[u32], &[u32]) = (&[3, 7, 1, 9, 4], &[2, 8, 5], &[6, 6, 0, 11], &[10]);
    let rows = vec![vec![s1, s2, s4], vec![s3]];
    let batch = Batch::packed(&rows, 0).unwrap();
    assert_eq!((batch.b, batch.t), (2, 9));
    assert_eq!(&batch.position_ids[..9], &[0, 1, 2, 3, 4, 0, 1, 2, 0]);
    assert_eq!(&batch.attention_mask[9..], &[1, 1, 1, 1, 0, 0, 0, 0, 0]);
    let v = m.dims.vocab;
    let packed = m.forward(&batch, NoneTape).unwrap().as_vec();
    for (r, row) in rows.iter().enumerate() {
        let mut col = 0;
        for s in row {
            let alone = m.forward(&Batch::unpadded(&[s.to_vec()]).unwrap(), NoneTape).unwrap().as_vec();
            let at = (r * batch.t + col) * v;
            let diff = max_abs_diff(&packed[at..at + s.len() * v], &alone);
            assert!(diff < 1e-5, "row {r}, sequence at column {col}: {diff}");
            col += s.len();
        }
    }
}

#[test]
fn packed_rows_equal_separate_sequences_gpt2() {
    packed_rows_equal_separate_sequences(tiny_gpt2(12));
}

#[test]
fn packed_rows_equal_separate_sequences_llama() {
    packed_rows_equal_separate_sequences(tiny_llama(12));
}
