//! Frozen parameters: a model whose embeddings and first blocks are frozen runs them untaped,
//! and the parameters that train get exactly the gradients of the whole backward pass; PPO's
//! `num_layers_unfrozen` holds the bottom of the policy and of the critic.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use dfdx::prelude::*;
use rlhf::stages::ppo_models::{
    policy_and_reference_logprobs, Critic, PpoModels, Seq, SharedBottoms, ValueModelConfig,
};
use rlhf_policies::checkpoint::{read_safetensors, HostTensor};
use rlhf_policies::params::ParamRef;
use rlhf_policies::{Batch, CausalLm, ModelConfig};

fn gpt2() -> ModelConfig {
    ModelConfig::gpt2_preset(23, 16, 3, 2, 32)
}

fn llama() -> ModelConfig {
    let json = r#"{"model_type":"llama","vocab_size":23,"hidden_size":16,"intermediate_size":24,
        "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":4,
        "rms_norm_eps":1e-5,"rope_theta":500.0,"max_position_embeddings":64,"tie_word_embeddings":false}"#;
    ModelConfig::from_json_str(json).unwrap()
}

/// Each parameter's gradient of a loss over the log-probs and entropies (the fused head op) of
/// some rows of the hidden states (the last block keeps only those), `None` where the backward
/// pass recorded none.
fn gradients(m: &CausalLm<Cpu>) -> Vec<(String, Option<Vec<f32>>)> {
    let batch = Batch::right_padded(&[vec![3, 1, 4, 1, 5, 9], vec![2, 6, 5]], 0).unwrap();
    let rows = [2, 4, 5, 7, 8];
    let h = m.forward_hidden_rows(&batch, &rows, OwnedTape::<f32, Cpu>::default()).unwrap();
    let grads = m.logprobs_and_entropy(h, &[1, 5, 9, 6, 5], 0.9).square().mean().backward();
    let read = |p: &ParamRef<'_, Cpu>| match p {
        ParamRef::V(t) => grads.get(*t).as_vec(),
        ParamRef::M(t) => grads.get(*t).as_vec(),
    };
    // `get` panics on a parameter without a gradient: quietly, here
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = m.params().into_iter().map(|(n, p)| (n, catch_unwind(AssertUnwindSafe(|| read(&p))).ok())).collect();
    std::panic::set_hook(hook);
    out
}

#[test]
fn an_untaped_frozen_bottom_leaves_the_gradients_that_train_unchanged() {
    for (family, cfg, tied) in [("gpt2", gpt2(), true), ("llama", llama(), false)] {
        let mut m = CausalLm::new(cfg, &Cpu::default(), 5).unwrap();
        let whole = gradients(&m);
        assert!(whole.iter().all(|(_, g)| g.is_some()), "{family}: every parameter has a gradient");
        for k in 1..=3 {
            // with all blocks frozen, an untied head too
            let bottom = |n: &str| {
                n == "wte"
                    || n == "wpe"
                    || (0..k).any(|i| n.starts_with(&format!("blocks.{i}.")))
                    || k == 3 && n == "lm_head"
            };
            assert_eq!(m.set_frozen_trunk(bottom), k, "{family}: {k} blocks run untaped");
            for ((name, want), (_, got)) in whole.iter().zip(gradients(&m)) {
                if !bottom(name) {
                    assert_eq!(
                        got.as_ref(),
                        want.as_ref(),
                        "{family}, {k} frozen: {name} trains with the same gradient"
                    );
                } else {
                    // a frozen head (the tied wte, or lm_head) gets no weight gradient either
                    assert!(got.is_none(), "{family}, {k} frozen: {name} got a gradient");
                }
            }
        }
        if !tied {
            // a frozen head alone: its gradient is skipped, everything else unchanged
            assert_eq!(m.set_frozen_trunk(|n| n == "lm_head"), 0, "{family}: embeddings train");
            for ((name, want), (_, got)) in whole.iter().zip(gradients(&m)) {
                assert_eq!(got.as_ref(), if name == "lm_head" { None } else { want.as_ref() }, "{family}: {name}");
            }
        }
        // a frozen block above a training one, or training embeddings, run taped: their
        // frozen linear layers form no weight or bias gradient (Llama's per-op path and GPT-2's
        // whole-block op alike), everything else is unchanged
        let skipped =
            |n: &str| n.starts_with("blocks.") && (n.contains(".attn.") || n.contains(".mlp.")) && !n.contains("norm");
        assert_eq!(m.set_frozen_trunk(|n| n.starts_with("blocks.")), 0, "{family}: embeddings train");
        for ((name, want), (_, got)) in whole.iter().zip(gradients(&m)) {
            assert_eq!(got.as_ref(), if skipped(name) { None } else { want.as_ref() }, "{family}: {name}");
        }
        assert_eq!(m.set_frozen_trunk(|n| n == "wte" || n == "wpe" || n.starts_with("blocks.1.")), 0, "{family}");
        for ((name, want), (_, got)) in whole.iter().zip(gradients(&m)) {
            // a frozen tied wte keeps only its embedding's part: the head's is skipped
            if name != "wte" || !tied {
                let none = skipped(name) && name.starts_with("blocks.1.");
                assert_eq!(got.as_ref(), if none { None } else { want.as_ref() }, "{family}: {name}");
            }
        }
        m.set_frozen_trunk(|n| n == "wte" || n == "wpe" || n.starts_with("blocks.0."));
        assert_eq!(gradients(&m.frozen_copy()).iter().filter(|(_, g)| g.is_none()).count(), 0, "a copy starts whole");
    }
}

/// trlx's hydra reference: a policy and a reference that share their embeddings and first
/// blocks run those once ([`CausalLm::bottom`]) and their tops apart — the same numbers as two
/// whole forwards, and each model's own top (the policy's differs from the reference's here).
#[test]
fn a_shared_bottom_gives_both_models_their_own_log_probs_exactly() {
    for (family, cfg) in [("gpt2", gpt2()), ("llama", llama())] {
        let reference = CausalLm::new(cfg, &Cpu::default(), 7).unwrap();
        let mut policy = reference.frozen_copy();
        let top = policy.blocks.len() - 1;
        policy.blocks[top].wo.w = policy.blocks[top].wo.w.clone() * 1.5;
        assert_eq!(reference.shared_bottom(&policy, 9), 2, "{family}: all but the top block");
        assert_eq!(reference.shared_bottom(&policy, 1), 1, "{family}: at most the limit");
        let seqs = [Seq { ids: vec![3, 1, 4, 1, 5, 9], prompt_len: 2 }, Seq { ids: vec![2, 6, 5], prompt_len: 1 }];
        let seqs: Vec<&Seq> = seqs.iter().collect();
        let whole = policy_and_reference_logprobs(&policy, Some(&reference), 0, &seqs, 0, 0.7).unwrap();
        assert_ne!(Some(&whole.0), whole.1.as_ref(), "{family}: the tops differ");
        for k in 1..=2 {
            let split = policy_and_reference_logprobs(&policy, Some(&reference), k, &seqs, 0, 0.7).unwrap();
            assert_eq!(split, whole, "{family}: a bottom of {k} blocks");
        }
        let e = policy_and_reference_logprobs(&policy, Some(&reference), 3, &seqs, 0, 0.7).unwrap_err();
        assert!(e.to_string().contains("leaves none of 3 above it"), "{e}");
        let ln1 = policy.blocks[0].ln1.as_mut().unwrap();
        ln1.w = ln1.w.clone() + 0.1;
        assert_eq!(reference.shared_bottom(&policy, 9), 0, "{family}: block 0 differs");
    }
}

/// PPO's scoring pass with a separate critic started from the policy: policy, critic and
/// reference share the frozen bottom and run it once — log-probs, values and the reference's
/// log-probs bit-identical to three whole forwards, taped or not.
#[test]
fn ppo_models_share_the_frozen_bottom_exactly() {
    let bottom = |n: &str| n == "wte" || n == "wpe" || n.starts_with("blocks.0.") || n.starts_with("blocks.1.");
    for (family, cfg) in [("gpt2", gpt2()), ("llama", llama())] {
        let reference = CausalLm::new(cfg, &Cpu::default(), 8).unwrap();
        let mut models =
            PpoModels::new(reference.frozen_copy(), &ValueModelConfig::Separate { init: None }, None).unwrap();
        let Critic::Separate(critic) = &mut models.critic else { unreachable!() };
        critic.head.w = critic.head.w.clone() + 0.3;
        assert_eq!((critic.model.set_frozen_trunk(bottom), models.policy.set_frozen_trunk(bottom)), (2, 2));
        models.policy.blocks[2].wo.w = models.policy.blocks[2].wo.w.clone() * 1.5;
        models.shares = SharedBottoms::of(&models, &reference);
        assert_eq!(models.shares, SharedBottoms { critic: 2, reference: 2 }, "{family}");
        let seqs = [Seq { ids: vec![3, 1, 4, 1, 5, 9], prompt_len: 2 }, Seq { ids: vec![2, 6, 5], prompt_len: 1 }];
        let seqs: Vec<&Seq> = seqs.iter().collect();
        let run = |m: &PpoModels<Cpu>| {
            let (lpe, values, rl) = m.forward_with(Some(&reference), &seqs, None, (0, 0.7), NoneTape).unwrap();
            let (tlpe, tvalues) = m.forward(&seqs, None, 0, 0.7, OwnedTape::<f32, Cpu>::default()).unwrap();
            (lpe.as_vec(), values.as_vec(), rl.unwrap(), tlpe.as_vec(), tvalues.as_vec())
        };
        let shared = run(&models);
        models.shares = SharedBottoms::default();
        let whole = run(&models);
        assert_eq!(shared, whole, "{family}");
        assert!(whole.0 != whole.2 && whole.0 == whole.3 && whole.1 == whole.4, "{family}: own tops, taped alike");
    }
}

/// `optim.num_layers_unfrozen: 1` in PPO with a separate critic (both 2-block GPT-2s started
/// from the SFT model): the embeddings and block 0 of each stay as they were, block 1 and the
/// final norm train; the first minibatch's ratio is exactly 1 and the KL 0 at iteration 1.
#[test]
fn ppo_trains_only_the_top_block_of_the_policy_and_the_critic() {
    let d = tempfile::tempdir().unwrap();
    let mut c = common::ppo_config(d.path(), 2);
    (c.value_model, c.checkpoint_every) = (ValueModelConfig::Separate { init: None }, 2);
    c.optim.num_layers_unfrozen = Some(1);
    let sft = read_safetensors(&c.policy.join("model.safetensors")).unwrap();
    rlhf::stages::ppo::train(c, false).unwrap();
    // scored through the shared bottom: the invariants of iteration 1 hold exactly
    let m: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("ppo/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!((m[0]["objective/kl"].as_f64(), m[0]["debug/first_minibatch_ratio"].as_f64()), (Some(0.0), Some(1.0)));
    assert_eq!(m[1]["debug/first_minibatch_ratio"].as_f64(), Some(1.0));
    assert!(m[1]["objective/kl"].as_f64().unwrap() != 0.0, "the policy moved");
    let step = d.path().join("ppo/checkpoints/step-2");
    for (who, file) in [("policy", "model.safetensors"), ("critic", "value/model.safetensors")] {
        let after: BTreeMap<String, HostTensor> = read_safetensors(&step.join(file)).unwrap();
        let (mut held, mut moved) = (vec![], vec![]);
        for (name, t) in &sft {
            if after[name].data == t.data {
                held.push(name.as_str())
            } else {
                moved.push(name.as_str())
            }
        }
        let bottom = |n: &str| n.contains(".wte.") || n.contains(".wpe.") || n.contains(".h.0.");
        assert!(held.iter().all(|n| bottom(n)) && held.len() == 2 + 12, "{who} held {held:?}");
        assert!(moved.iter().all(|n| !bottom(n)) && moved.len() == 12 + 2, "{who} moved {moved:?}");
    }
}

/// The weights frozen in the policy are stored once for the policy and its reference
/// ([`CausalLm::share_storage`]): the same buffer and tensor id, nothing shared that differs
/// or that `share` leaves out, and training the policy gives the same weights as without
/// sharing while the reference's logits stay as they were.
#[test]
fn frozen_weights_are_stored_once_and_change_nothing() {
    use rlhf_policies::params::tensor_id;
    use rlhf_policies::{AdamW, AdamWConfig};
    let frozen = |n: &str| n == "wte" || n == "wpe" || n.starts_with("blocks.0.");
    let policy = CausalLm::new(gpt2(), &Cpu::default(), 9).unwrap();
    let mut reference = policy.frozen_copy();
    let ln2 = reference.blocks[0].ln2.as_mut().unwrap();
    ln2.w = ln2.w.clone() + 0.25;
    let mut shared = reference.frozen_copy();
    let n = shared.share_storage(&policy, frozen);
    let (c, p) = (16, 32);
    // wte (23 × 16), wpe (32 × 16) and block 0 (attention 4c² + 4c, MLP 8c² + 5c, norms 4c)
    assert_eq!(n, 23 * c + p * c + (12 * c * c + 13 * c) - c, "all but the changed norm");
    assert_eq!(tensor_id(&shared.wte), tensor_id(&policy.wte), "the same tensor");
    let ln2_w = |m: &CausalLm<Cpu>| tensor_id(&m.blocks[0].ln2.as_ref().unwrap().w);
    assert_ne!(ln2_w(&shared), ln2_w(&policy), "it differs: its own");
    assert_ne!(tensor_id(&shared.blocks[1].wq.w), tensor_id(&policy.blocks[1].wq.w), "not frozen: its own");
    let batch = Batch::right_padded(&[vec![3, 1, 4, 1, 5, 9], vec![2, 6, 5]], 0).unwrap();
    let logits = |m: &CausalLm<Cpu>| m.forward(&batch, NoneTape).unwrap().as_vec();
    assert_eq!(logits(&shared), logits(&reference));
    let train = |mut m: CausalLm<Cpu>| {
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-2,
            freeze: vec!["wte".into(), "wpe".into(), "blocks.0".into()],
            ..Default::default()
        });
        for _ in 0..3 {
            let mut grads = m.forward(&batch, OwnedTape::<f32, Cpu>::default()).unwrap().square().mean().backward();
            opt.step(m.params_mut(), &mut grads, 1e-2).unwrap();
        }
        m.params().into_iter().map(|(n, p)| (n, p.to_vec())).collect::<Vec<_>>()
    };
    let alone = train(policy.frozen_copy());
    assert_eq!(train(policy), alone, "the policy trains as it would alone");
    assert_eq!(logits(&shared), logits(&reference), "the reference is untouched");
}
