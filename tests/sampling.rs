//! Sampling: seeded determinism, top-k = 1 equals greedy, the top-p nucleus on a fixed logit
//! vector, and returned log-probs equal to log_softmax(logits / T) of the filtered distribution.

mod common;

use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};
use rlhf_policies::{
    filtered_logprobs, generate, sample_from_logits, Batch, CausalLm, InferenceModel, ModelConfig, SamplingConfig,
};

fn setup() -> (CausalLm<Cpu>, InferenceModel) {
    let mut cfg = ModelConfig::gpt2_preset(50, 16, 2, 2, 64);
    if let ModelConfig::Gpt2(c) = &mut cfg {
        c.initializer_range = 0.2;
    }
    let m = CausalLm::new(cfg, &Cpu::default(), 11).unwrap();
    let e = InferenceModel::from_model(&m);
    (m, e)
}

const PROMPTS: [&[u32]; 3] = [&[1, 2, 3], &[4, 5], &[6, 7, 8, 9]];

fn prompts() -> Vec<Vec<u32>> {
    PROMPTS.iter().map(|p| p.to_vec()).collect()
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let (_, e) = setup();
    let cfg = SamplingConfig { max_new_tokens: 20, seed: 42, ..Default::default() };
    let a = generate(&e, &prompts(), 0, &cfg).unwrap();
    let b = generate(&e, &prompts(), 0, &cfg).unwrap();
    assert_eq!(a, b);
    let c = generate(&e, &prompts(), 0, &SamplingConfig { seed: 43, ..cfg.clone() }).unwrap();
    assert_ne!(a.tokens, c.tokens);
    // a row's tokens do not depend on the batch it is in
    let solo = generate(&e, &prompts()[..1], 0, &cfg).unwrap();
    assert_eq!(solo.tokens[0], a.tokens[0]);
}

#[test]
fn top_k_1_equals_greedy() {
    let (_, e) = setup();
    let greedy =
        generate(&e, &prompts(), 0, &SamplingConfig { greedy: true, max_new_tokens: 15, ..Default::default() })
            .unwrap();
    let k1 =
        generate(&e, &prompts(), 0, &SamplingConfig { top_k: 1, max_new_tokens: 15, seed: 7, ..Default::default() })
            .unwrap();
    assert_eq!(greedy.tokens, k1.tokens);
    // a point mass: log-prob 0
    assert!(k1.logprobs.iter().flatten().all(|&lp| lp == 0.0));
}

#[test]
fn top_p_keeps_exactly_the_nucleus() {
    // probabilities 0.5, 0.3, 0.15, 0.05 (shuffled positions)
    let probs = [0.15f32, 0.5, 0.05, 0.3];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    // top_p = 0.7: 0.5 < 0.7, then 0.5 + 0.3 reaches it → keep {0.5, 0.3}
    let lp = filtered_logprobs(&logits, 0, 0.7);
    assert_eq!(lp[0], f32::NEG_INFINITY);
    assert_eq!(lp[2], f32::NEG_INFINITY);
    assert!((lp[1].exp() - 0.625).abs() < 1e-6 && (lp[3].exp() - 0.375).abs() < 1e-6);
    // top_p = 0.5 keeps the single most likely token (its mass already reaches p)
    let lp = filtered_logprobs(&logits, 0, 0.5);
    assert_eq!(lp.iter().filter(|l| l.is_finite()).count(), 1);
    // draw 20k tokens: never outside the nucleus, frequencies as renormalised
    let cfg = SamplingConfig { top_p: 0.7, ..Default::default() };
    let mut rng = StdRng::seed_from_u64(5);
    let mut counts = [0usize; 4];
    for _ in 0..20_000 {
        let mut l = logits.clone();
        let (id, lp) = sample_from_logits(&mut l, &cfg, false, &mut rng);
        counts[id as usize] += 1;
        assert!((lp.exp() - [0.0, 0.625, 0.0, 0.375][id as usize]).abs() < 1e-6);
    }
    assert_eq!(counts[0] + counts[2], 0);
    let f1 = counts[1] as f64 / 20_000.0;
    assert!((f1 - 0.625).abs() < 0.015, "frequency {f1}");
}

#[test]
fn min_new_tokens_forbids_eos() {
    let logits = vec![5.0f32, 0.0, -1.0];
    let cfg = SamplingConfig { eos_ids: vec![0], ..Default::default() };
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..200 {
        let (id, _) = sample_from_logits(&mut logits.clone(), &cfg, true, &mut rng);
        assert_ne!(id, 0);
    }
}

/// Independent reference: softmax of logits/T restricted to the top-k ids and then the nucleus.
fn reference_logprob(logits: &[f32], t: f32, k: usize, p: f32, id: usize) -> f32 {
    let scaled: Vec<f64> = logits.iter().map(|&l| (l / t) as f64).collect();
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].partial_cmp(&scaled[a]).unwrap());
    order.truncate(k);
    let z: f64 = order.iter().map(|&i| scaled[i].exp()).sum();
    let mut kept = vec![];
    let mut mass = 0.0;
    for &i in &order {
        if mass >= p as f64 {
            break;
        }
        mass += scaled[i].exp() / z;
        kept.push(i);
    }
    assert!(kept.contains(&id), "sampled token {id} outside the filtered set");
    let z2: f64 = kept.iter().map(|&i| scaled[i].exp()).sum();
    (scaled[id] - z2.ln()) as f32
}

#[test]
fn returned_logprobs_match_the_filtered_distribution() {
    let (m, e) = setup();
    let (t, k, p) = (0.7f32, 8usize, 0.9f32);
    let cfg = SamplingConfig { temperature: t, top_k: k, top_p: p, max_new_tokens: 10, seed: 3, ..Default::default() };
    let out = generate(&e, &prompts(), 0, &cfg).unwrap();
    let v = m.dims.vocab;
    for (r, prompt) in prompts().iter().enumerate() {
        let mut seq = prompt.clone();
        for (s, (&tok, &lp)) in out.tokens[r].iter().zip(&out.logprobs[r]).enumerate() {
            let logits = m.forward(&Batch::unpadded(&[seq.clone()]).unwrap(), NoneTape).unwrap().as_vec();
            let last = &logits[(seq.len() - 1) * v..];
            let want = reference_logprob(last, t, k, p, tok as usize);
            assert!((lp - want).abs() < 1e-4, "row {r} step {s}: {lp} vs {want}");
            seq.push(tok);
        }
    }
}

#[test]
fn eos_finishes_a_row_and_pads_the_rest() {
    let (_, e) = setup();
    // make every token an EOS: each row stops after one token
    let cfg = SamplingConfig { eos_ids: (0..50).collect(), max_new_tokens: 5, ..Default::default() };
    let out = generate(&e, &prompts(), 0, &cfg).unwrap();
    assert!(out.tokens.iter().all(|t| t.len() == 1));
    assert!(out.finished.iter().all(|&f| f));
    // stop ids work the same way, and rows that never stop run to max_new_tokens
    let cfg = SamplingConfig { stop_ids: vec![], max_new_tokens: 5, ..Default::default() };
    let out = generate(&e, &prompts(), 0, &cfg).unwrap();
    assert!(out.tokens.iter().all(|t| t.len() == 5) && out.finished.iter().all(|&f| !f));
}
