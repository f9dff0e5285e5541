//! LoRA training (`optim.lora`, `rlhf_policies::lora`): the adapted forward equals the merged
//! weights' forward (what checkpoints and the rollout engines hold), the update's gradients
//! match finite differences while the frozen base gets none, and the stages train the update
//! alone, save a plain merged model and resume exactly.

mod common;

use common::models::*;
use common::*;
use dfdx::prelude::*;
use rlhf_policies::lora::{LoraConfig, TargetModules};
use rlhf_policies::{Batch, CausalLm, InferenceModel, KvCache, LogitsAt, ParamMut, ParamRef};

/// `m` with an update on `targets` whose `B` is random too (a fresh one is zero); with `dora`,
/// its magnitudes each moved off their column norms by up to 20%.
fn adapted_with(mut m: CausalLm<Cpu>, targets: TargetModules, dora: bool) -> CausalLm<Cpu> {
    let cfg = LoraConfig { r: 3, lora_alpha: 6.0, target_modules: targets, use_dora: dora, ..LoraConfig::default() };
    assert!(m.add_lora(&cfg, 7).unwrap() > 0);
    let dev = Cpu::default();
    let mut k = 0.0f32;
    for (name, p) in m.params_mut() {
        k += 1.0;
        match (name.ends_with(".lora_b"), p) {
            (true, ParamMut::M(t)) => {
                let v: Vec<f32> = (0..t.shape().0 * t.shape().1).map(|i| ((i as f32 * 0.37 + k).sin()) * 0.3).collect();
                *t = dev.tensor_from_vec(v, *t.shape());
            }
            (false, ParamMut::V(t)) if name.ends_with(".lora_magnitude") => {
                let v: Vec<f32> =
                    t.as_vec().iter().enumerate().map(|(i, m)| m * (1.0 + 0.2 * (i as f32 * 0.71 + k).sin())).collect();
                *t = dev.tensor_from_vec(v, *t.shape());
            }
            _ => {}
        }
    }
    m
}

fn logits(m: &CausalLm<Cpu>, batch: &Batch) -> Vec<f32> {
    m.forward(batch, NoneTape).unwrap().as_vec()
}

fn check_merged(cfg: rlhf_policies::ModelConfig, targets: TargetModules) {
    check_merged_with(cfg, targets, false)
}

fn check_merged_with(cfg: rlhf_policies::ModelConfig, targets: TargetModules, dora: bool) {
    let base = model(cfg, 4);
    let m = adapted_with(base.clone(), targets, dora);
    let batch = Batch::left_padded(&[vec![3, 1, 4, 1, 5, 9], vec![2, 6, 5]], 0).unwrap();
    let (plain, got) = (logits(&base, &batch), logits(&m, &batch));
    assert!(max_abs_diff(&plain, &got) > 1e-2, "the update moves the logits");
    // the saved checkpoint is the merged model
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path(), None).unwrap();
    let merged = CausalLm::load_pretrained(dir.path(), &Cpu::default()).unwrap();
    assert!(!merged.has_lora());
    let diff = max_abs_diff(&logits(&merged, &batch), &got);
    assert!(diff < 1e-5, "merged checkpoint against the adapted forward: {diff}");
    // the rollout engine runs the merged weights
    let engine = InferenceModel::from_model(&m);
    let pad: Vec<usize> = vec![0, 3];
    let mut cache = KvCache::new(&m.dims, pad, batch.t);
    let all = engine.forward(&mut cache, &batch.ids, batch.t, LogitsAt::All).unwrap();
    let v = m.dims.vocab;
    assert!(max_abs_diff(&all[..batch.t * v], &got[..batch.t * v]) < 1e-5, "engine row 0");
}

#[test]
fn adapted_forward_is_the_merged_models() {
    check_merged(tiny_llama(64), TargetModules::default());
    check_merged(tiny_gpt2(64), TargetModules::default());
    check_merged(tiny_neox(64, true), TargetModules::Names(vec!["query_key_value".into(), "dense_4h_to_h".into()]));
    check_merged(tiny_llama(64), TargetModules::Names(vec!["q_proj".into(), "mlp.down".into()]));
}

/// DoRA: the adapted forward (columns rescaled to their magnitudes) is the merged weights'
/// forward, and a fresh update leaves the model exactly as it was.
#[test]
fn dora_forward_is_the_merged_models_and_starts_as_the_base() {
    check_merged_with(tiny_llama(64), TargetModules::default(), true);
    check_merged_with(tiny_gpt2(64), TargetModules::default(), true);
    check_merged_with(tiny_neox(64, true), TargetModules::Names(vec!["query_key_value".into()]), true);
    let base = model(tiny_llama(64), 4);
    let mut fresh = base.clone();
    fresh.add_lora(&LoraConfig { use_dora: true, ..LoraConfig::default() }, 3).unwrap();
    let batch = Batch::left_padded(&[vec![3, 1, 4, 1, 5, 9], vec![2, 6, 5]], 0).unwrap();
    let diff = max_abs_diff(&logits(&fresh, &batch), &logits(&base, &batch));
    assert!(diff < 1e-5, "a fresh DoRA update moves the logits by {diff}");
    let (merged, plain) = (&fresh.linears()[0].1.merged_w(), &base.linears()[0].1.w.as_vec());
    assert_eq!(merged, plain, "m / ‖W‖_c is exactly 1");
}

#[test]
fn targets_match_as_peft_matches_them() {
    let count = |cfg: rlhf_policies::ModelConfig, t: &[&str]| {
        let mut m = model(cfg, 1);
        let c = LoraConfig {
            target_modules: TargetModules::Names(t.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        m.add_lora(&c, 0)
            .map(|_| m.linears().iter().filter(|(_, l)| l.lora.is_some()).map(|(n, _)| n.clone()).collect::<Vec<_>>())
    };
    // GPT-2's c_attn is q, k and v; its c_proj both the attention's and the MLP's
    let q = count(tiny_gpt2(32), &["c_attn"]).unwrap();
    assert_eq!(q.len(), 3 * 2, "{q:?}");
    let p = count(tiny_gpt2(32), &["c_proj"]).unwrap();
    assert!(p.contains(&"blocks.0.attn.o".to_string()) && p.contains(&"blocks.1.mlp.proj".to_string()), "{p:?}");
    assert_eq!(count(tiny_llama(32), &["v_proj"]).unwrap(), vec!["blocks.0.attn.v", "blocks.1.attn.v"]);
    assert_eq!(count(tiny_llama(32), &["blocks.1.mlp.up"]).unwrap(), vec!["blocks.1.mlp.up"]);
    assert_eq!(count(tiny_llama(32), &["mlp.down"]).unwrap(), vec!["blocks.0.mlp.down", "blocks.1.mlp.down"]);
    // whole trailing parts only, as PEFT: `mlp` is no layer's name
    assert!(count(tiny_llama(32), &["mlp"]).is_err());
    let err = count(tiny_llama(32), &["q_proj", "qproj"]).unwrap_err().to_string();
    assert!(err.contains("optim.lora.target_modules") && err.contains("\"qproj\" matches no linear layer"), "{err}");
    assert!(err.contains("model.layers.0.self_attn.q_proj"), "names the layers: {err}");
}

/// PEFT's `layers_to_transform`, and `optim.num_layers_unfrozen` keeping the update in the
/// blocks that train.
#[test]
fn updates_go_to_the_blocks_named_or_the_unfrozen_top() {
    let adapted_names = |m: &CausalLm<Cpu>| -> Vec<String> {
        m.linears().iter().filter(|(_, l)| l.lora.is_some()).map(|(n, _)| n.clone()).collect()
    };
    let with = |layers: &str, keep: Option<usize>| {
        let text = format!(r#"{{"target_modules": ["q_proj"], "layers_to_transform": {layers}}}"#);
        let c: LoraConfig = serde_json::from_str(&text).unwrap();
        let mut m = model(tiny_llama(32), 1);
        let c = c.within_top(keep, m.blocks.len())?;
        m.add_lora(&c, 0).map(|_| adapted_names(&m))
    };
    assert_eq!(with("1", None).unwrap(), vec!["blocks.1.attn.q"]);
    assert_eq!(with("[0, 1]", None).unwrap(), vec!["blocks.0.attn.q", "blocks.1.attn.q"]);
    assert_eq!(with("null", Some(1)).unwrap(), vec!["blocks.1.attn.q"], "the top block only");
    assert_eq!(with("null", None).unwrap().len(), 2);
    let below = with("[0]", Some(1)).unwrap_err().to_string();
    assert!(
        below.contains("optim.lora.layers_to_transform") && below.contains("block 0 is below the top 1"),
        "{below}"
    );
    let beyond = with("[2]", None).unwrap_err().to_string();
    assert!(beyond.contains("block 2 is not in the model (it has 2 blocks"), "{beyond}");
    assert!(with("[]", None).unwrap_err().to_string().contains("is empty"));

    // in PPO: the bottom (embeddings, block 0) carries no update, so the policy, its critic and
    // the reference share it as without LoRA — stored once, run once per batch
    use rlhf::stages::ppo_models::{PpoModels, SharedBottoms, ValueModelConfig};
    let reference = model(tiny_llama(32), 3);
    let mut models = PpoModels::new(reference.frozen_copy(), &ValueModelConfig::Separate { init: None }, None).unwrap();
    let optim = rlhf_policies::AdamWConfig {
        lora: Some(LoraConfig::default()),
        num_layers_unfrozen: Some(1),
        ..Default::default()
    };
    rlhf::stages::lora_state::attach(&mut models, &optim, 0).unwrap();
    let mut opt = rlhf_policies::AdamW::new(optim);
    rlhf::stages::common::untape_frozen(&mut models, &mut opt, |_| true).unwrap();
    assert!(adapted_names(&models.policy).iter().all(|n| n.starts_with("blocks.1.")));
    assert_eq!(SharedBottoms::of(&models, &reference), SharedBottoms { critic: 1, reference: 1 });
}

#[test]
fn update_gradients_match_finite_differences_and_the_base_gets_none() {
    check_update_gradients(false);
}

/// DoRA's gradients, the column norm `‖W + s·A·B‖_c` held constant as PEFT holds it: the
/// magnitudes' match the loss's finite differences; `A`'s and `B`'s match them with each
/// output's magnitude moved along with its norm (so that `m / ‖·‖_c` stays as it was).
#[test]
fn dora_gradients_match_finite_differences() {
    check_update_gradients(true);
}

/// `(in, out)` column norms of `W + s·A·B` for `l`'s update, on the host.
fn column_norms(l: &rlhf_policies::model::Linear<Cpu>) -> Vec<f32> {
    let lora = l.lora.as_ref().unwrap();
    let mut w = l.w.as_vec();
    let ((i, r), (_, o)) = (*lora.a.shape(), *lora.b.shape());
    let (a, b) = (lora.a.as_vec(), lora.b.as_vec());
    for p in 0..i {
        for q in 0..o {
            w[p * o + q] += lora.scale * (0..r).map(|k| a[p * r + k] * b[k * o + q]).sum::<f32>();
        }
    }
    (0..o).map(|q| (0..i).map(|p| w[p * o + q] * w[p * o + q]).sum::<f32>().sqrt()).collect()
}

fn check_update_gradients(dora: bool) {
    let dev = Cpu::default();
    let m = adapted_with(model(tiny_llama(48), 3), TargetModules::default(), dora);
    let (batch, targets, weights) = grad_check_batch();
    let n = targets.len();
    let lp = m
        .forward(&batch, OwnedTape::<f32, Cpu>::default())
        .unwrap()
        .log_softmax::<Axis<1>>()
        .select(dev.tensor_from_vec(targets.clone(), (n,)));
    let grads = (lp * dev.tensor_from_vec(weights.clone(), (n,))).sum::<Rank0, _>().negate().backward();
    let mut checked = 0;
    for (pi, (name, p)) in m.params().into_iter().enumerate() {
        if name.ends_with(".weight") && name.starts_with("blocks.") {
            // a frozen base weight: its gradient was never formed
            let ParamRef::M(t) = p else { continue };
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| grads.get(t)));
            assert!(got.is_err(), "{name} has a gradient");
            continue;
        }
        if !name.contains(".lora_") {
            continue;
        }
        let analytic = match p {
            ParamRef::M(t) => grads.get(t).as_vec(),
            ParamRef::V(t) => grads.get(t).as_vec(),
        };
        let layer = name.rsplit_once('.').unwrap().0;
        for k in 0..3 {
            let idx = (k * 7919 + pi * 31) % analytic.len();
            let f = |delta: f32| {
                let mut mm = m.clone();
                match mm.params_mut().into_iter().nth(pi).unwrap().1 {
                    ParamMut::M(t) => {
                        let mut v = t.as_vec();
                        v[idx] += delta;
                        *t = dev.tensor_from_vec(v, *t.shape());
                    }
                    ParamMut::V(t) => {
                        let mut v = t.as_vec();
                        v[idx] += delta;
                        *t = dev.tensor_from_vec(v, *t.shape());
                    }
                }
                if dora && !name.ends_with(".lora_magnitude") {
                    let before = column_norms(m.linears().into_iter().find(|(n, _)| n == layer).unwrap().1);
                    let lin = mm.linears_mut().into_iter().find(|(n, _)| n == layer).unwrap().1;
                    let after = column_norms(lin);
                    let lora = lin.lora.as_mut().unwrap();
                    let mag = lora.magnitude.as_ref().unwrap().as_vec();
                    let held: Vec<f32> =
                        mag.iter().zip(after.iter().zip(&before)).map(|(m, (a, b))| m * a / b).collect();
                    lora.magnitude = Some(dev.tensor_from_vec(held, (mag.len(),)));
                }
                loss_value(&mm, &batch, &targets, &weights) as f64
            };
            let fd = ((f(1e-2) - f(-1e-2)) / 2e-2) as f32;
            let g = analytic[idx];
            assert!((fd - g).abs() <= 2e-3 + 3e-2 * g.abs(), "{name}[{idx}]: analytic {g} vs finite difference {fd}");
            checked += 1;
        }
    }
    let per_layer = if dora { 3 } else { 2 };
    assert_eq!(checked, 3 * per_layer * 7 * 2, "every update tensor of both blocks");
}

/// A char-level GPT-2 and {prompt, response} pairs for SFT.
fn sft_config(dir: &std::path::Path, steps: usize) -> rlhf::stages::sft::SftConfig {
    let pairs = [("sky?", "blue."), ("grass?", "green."), ("snow?", "white."), ("coal?", "black.")];
    let all: String = pairs.iter().map(|(p, r)| format!("{p} {r}")).collect::<Vec<_>>().join("\n");
    let tok = rlhf_policies::Tokenizer::char_level(&format!("{all} Q:A")).unwrap();
    // std 0.3 (not 0.02): the frozen tied head can then give confident logits
    let model = model(rlhf_policies::ModelConfig::gpt2_preset(tok.vocab_size(), 32, 2, 2, 64), 3);
    let init = dir.join("init");
    model.save_pretrained(&init, Some(&tok)).unwrap();
    let data = dir.join("pairs.jsonl");
    let lines: Vec<String> =
        pairs.iter().map(|(p, r)| serde_json::json!({"prompt": p, "response": format!(" {r}")}).to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let lora = LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::default() };
    rlhf::stages::sft::SftConfig {
        out_dir: dir.join("run"),
        init,
        data,
        val_fraction: 0.0,
        prompt_template: "Q:{prompt}A:".into(),
        max_len: 40,
        batch_size: 4,
        steps,
        optim: rlhf_policies::AdamWConfig { lr: 3e-2, lora: Some(lora), ..Default::default() },
        eval_every: 100,
        checkpoint_every: steps,
        ..Default::default()
    }
}

#[test]
fn sft_trains_the_update_alone_saves_the_merged_model_and_resumes_exactly() {
    use rlhf_policies::checkpoint::read_safetensors;
    let d = tempfile::tempdir().unwrap();
    let c = sft_config(d.path(), 24);
    let report = rlhf::stages::sft::train(c.clone(), false).unwrap();
    let m = comparable_metrics(&d.path().join("run"));
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), report.train_loss as f64);
    assert!(last < 0.1 * first, "the update learns: loss {first} -> {last}");
    let ckpt = d.path().join("run/checkpoints/step-24");
    let (before, after) = (
        read_safetensors(&c.init.join("model.safetensors")).unwrap(),
        read_safetensors(&ckpt.join("model.safetensors")).unwrap(),
    );
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "a plain model: no LoRA tensors");
    for (name, t) in &before {
        // GPT-2's Conv1D weights of the blocks are adapted (merged); embeddings, norms, biases stay
        let adapted = name.contains(".h.") && name.ends_with(".weight") && !name.contains(".ln_");
        assert_eq!(after[name].data != t.data, adapted, "{name}");
    }
    // the optimizer holds the updates' moments only; lora.safetensors the updates and the bases
    let opt = read_safetensors(&ckpt.join("optimizer.safetensors")).unwrap();
    assert!(opt.len() == 2 * 2 * 6 * 2 && opt.keys().all(|k| k.contains(".lora_")), "{:?}", opt.keys());
    let state = read_safetensors(&ckpt.join("lora.safetensors")).unwrap();
    assert_eq!(state.len(), 3 * 6 * 2, "A, B and the base weight of 6 layers in 2 blocks");
    let base = CausalLm::load_pretrained(&c.init, &Cpu::default()).unwrap();
    for (name, p) in base.params() {
        if let Some(t) = state.get(&name) {
            assert_eq!(t.data, p.to_vec(), "{name}: the base weight, exactly");
        }
    }
    // the merged checkpoint computes what the adapted model did: resumed, it goes on the same
    let resumed = rlhf::stages::sft::SftConfig { out_dir: d.path().join("resumed"), checkpoint_every: 5, ..c.clone() };
    rlhf::stages::sft::train(resumed.clone(), false).unwrap();
    std::fs::remove_dir_all(d.path().join("resumed/checkpoints/step-24")).unwrap();
    std::fs::remove_dir_all(d.path().join("resumed/checkpoints/step-20")).unwrap();
    rlhf::stages::sft::train(resumed, true).unwrap();
    assert_eq!(comparable_metrics(&d.path().join("resumed")), m);
    // the PEFT adapter beside the merged model: over the initial model, also once resumed
    let init = c.init.canonicalize().unwrap().display().to_string();
    for run in ["run", "resumed"] {
        let adapter = d.path().join(run).join("checkpoints/step-24/adapter");
        let cfg = read_json(&adapter.join("adapter_config.json"));
        assert_eq!(cfg["base_model_name_or_path"].as_str(), Some(init.as_str()), "{run}");
        let (via_adapter, merged) = (
            CausalLm::load_pretrained(&adapter, &Cpu::default()).unwrap(),
            CausalLm::load_pretrained(&ckpt, &Cpu::default()).unwrap(),
        );
        let batch = Batch::unpadded(&[vec![1, 2, 3, 4, 5]]).unwrap();
        assert!(max_abs_diff(&logits(&via_adapter, &batch), &logits(&merged, &batch)) < 1e-5, "{run}");
    }
    // pretraining refuses it
    let pre = rlhf::stages::pretrain::PretrainConfig { optim: c.optim.clone(), ..Default::default() };
    let e = rlhf::stages::pretrain::train(pre, false).unwrap_err().to_string();
    assert!(e.contains("optim.lora"), "{e}");
}

#[test]
fn ppo_with_lora_starts_at_the_reference_and_resumes_exactly() {
    let run = |dir: &std::path::Path| {
        let mut c = ppo_config(dir, 3);
        c.optim.lora = Some(LoraConfig { r: 4, lora_alpha: 16.0, ..LoraConfig::default() });
        c.value_model = rlhf::stages::ppo_models::ValueModelConfig::Separate { init: None };
        c.checkpoint_every = 1;
        c
    };
    let a = tempfile::tempdir().unwrap();
    rlhf::stages::ppo::train(run(a.path()), false).unwrap();
    let ma = comparable_metrics(&a.path().join("ppo"));
    assert!(ma[0]["objective/kl"].as_f64().unwrap().abs() < 1e-4, "the update starts at zero");
    for r in &ma {
        assert_eq!(r["debug/first_minibatch_ratio"].as_f64().unwrap(), 1.0);
    }
    assert!(ma[2]["objective/kl"].as_f64().unwrap().abs() > 1e-3, "the policy moved");
    let opt =
        rlhf_policies::checkpoint::read_safetensors(&a.path().join("ppo/checkpoints/step-3/optimizer.safetensors"))
            .unwrap();
    assert!(opt.keys().any(|k| k.contains("value.head")), "the critic's head trains whole: {:?}", opt.keys());
    assert!(opt.keys().all(|k| k.contains(".lora_") || k.contains("value.head")), "{:?}", opt.keys());
    let b = tempfile::tempdir().unwrap();
    rlhf::stages::ppo::train(run(b.path()), false).unwrap();
    std::fs::remove_dir_all(b.path().join("ppo/checkpoints/step-3")).unwrap();
    rlhf::stages::ppo::train(run(b.path()), true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("ppo")), ma);
}

/// SFT with DoRA: it learns, the magnitudes train beside `A` and `B` (their moments in the
/// optimizer, their values in `lora.safetensors`), a resumed run goes on the same, and the PEFT
/// adapter (`use_dora`) reads back as the merged checkpoint.
#[test]
fn sft_with_dora_trains_the_magnitudes_and_resumes_exactly() {
    use rlhf_policies::checkpoint::read_safetensors;
    let d = tempfile::tempdir().unwrap();
    let mut c = sft_config(d.path(), 24);
    c.optim.lora.as_mut().unwrap().use_dora = true;
    c.checkpoint_every = 12;
    let report = rlhf::stages::sft::train(c.clone(), false).unwrap();
    let m = comparable_metrics(&d.path().join("run"));
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), report.train_loss as f64);
    assert!(last < 0.1 * first, "the update learns: loss {first} -> {last}");
    let ckpt = d.path().join("run/checkpoints/step-24");
    let opt = read_safetensors(&ckpt.join("optimizer.safetensors")).unwrap();
    assert_eq!(opt.keys().filter(|k| k.contains(".lora_magnitude")).count(), 2 * 6 * 2, "{:?}", opt.keys());
    let state = read_safetensors(&ckpt.join("lora.safetensors")).unwrap();
    assert_eq!(state.len(), 4 * 6 * 2, "A, B, m and the base weight of 6 layers in 2 blocks");
    let adapter = ckpt.join("adapter");
    assert_eq!(read_json(&adapter.join("adapter_config.json"))["use_dora"], true);
    let (via_adapter, merged) = (
        CausalLm::load_pretrained(&adapter, &Cpu::default()).unwrap(),
        CausalLm::load_pretrained(&ckpt, &Cpu::default()).unwrap(),
    );
    let batch = Batch::unpadded(&[vec![1, 2, 3, 4, 5]]).unwrap();
    assert!(max_abs_diff(&logits(&via_adapter, &batch), &logits(&merged, &batch)) < 1e-5);
    std::fs::remove_dir_all(&ckpt).unwrap();
    rlhf::stages::sft::train(c, true).unwrap();
    assert_eq!(comparable_metrics(&d.path().join("run")), m);
}

/// A reward model trained with LoRA: its checkpoint's PEFT adapter is a `SEQ_CLS` one with the
/// `score` head whole and the normalisation beside it, and loads back as the merged checkpoint.
#[test]
fn reward_lora_exports_a_sequence_classification_adapter() {
    use rlhf_policies::LearnedReward;
    let d = tempfile::tempdir().unwrap();
    let mut c = marker_cfg(d.path(), 40);
    c.optim.lora = Some(LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::default() });
    rlhf::stages::reward::train(c, false).unwrap();
    let ckpt = d.path().join("run/checkpoints/step-40");
    let adapter = ckpt.join("adapter");
    let cfg = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(
        (cfg["task_type"].as_str(), cfg["modules_to_save"].clone()),
        (Some("SEQ_CLS"), serde_json::json!(["score"]))
    );
    let tensors = rlhf_policies::checkpoint::read_safetensors(&adapter.join("adapter_model.safetensors")).unwrap();
    assert_eq!(tensors["base_model.model.score.weight"].shape, vec![1, 32]);
    assert!(rlhf::eval::is_reward_model(&adapter).unwrap());
    let (merged, norm) = LearnedReward::load_pretrained(&ckpt, &Cpu::default()).unwrap();
    let (via_adapter, adapter_norm) = LearnedReward::load_pretrained(&adapter, &Cpu::default()).unwrap();
    assert!(norm.is_some() && adapter_norm == norm, "{adapter_norm:?} against {norm:?}");
    let seqs = vec![vec![1, 5, 9, 2, 14, 3], vec![7, 7, 1]];
    let (a, b) = (via_adapter.score_ids(&seqs).unwrap(), merged.score_ids(&seqs).unwrap());
    assert!(max_abs_diff(&a, &b) < 1e-5, "{a:?} against {b:?}");
}

/// `m`'s updates exported as a PEFT adapter over `m_base` saved beside it, read back through
/// the adapter loader: the adapted model's logits.
fn export_round_trip(base: CausalLm<Cpu>, targets: TargetModules) -> serde_json::Value {
    export_round_trip_with(base, targets, false)
}

fn export_round_trip_with(base: CausalLm<Cpu>, targets: TargetModules, dora: bool) -> serde_json::Value {
    let m = adapted_with(base.clone(), targets, dora);
    let d = tempfile::tempdir().unwrap();
    base.save_pretrained(&d.path().join("base"), None).unwrap();
    let (tensors, config) = rlhf_policies::peft_export::adapter_of(&m, "../base", None).unwrap();
    let adapter = d.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), &config).unwrap();
    rlhf_policies::checkpoint::write_safetensors(&adapter.join("adapter_model.safetensors"), &tensors).unwrap();
    let read = CausalLm::load_pretrained(&adapter, &Cpu::default()).unwrap();
    let batch = Batch::left_padded(&[vec![3, 1, 4, 1, 5, 9], vec![2, 6, 5]], 0).unwrap();
    let diff = max_abs_diff(&logits(&read, &batch), &logits(&m, &batch));
    assert!(diff < 1e-5, "exported adapter against the adapted model: {diff}");
    assert!(max_abs_diff(&logits(&base, &batch), &logits(&m, &batch)) > 1e-2);
    serde_json::from_str(&config).unwrap()
}

#[test]
fn updates_export_as_a_peft_adapter() {
    let names = |v: &[&str]| TargetModules::Names(v.iter().map(|s| s.to_string()).collect());
    let c = export_round_trip(model(tiny_llama(64), 4), TargetModules::default());
    assert_eq!(
        (c["r"].as_u64(), c["lora_alpha"].as_f64(), c["fan_in_fan_out"].as_bool()),
        (Some(3), Some(6.0), Some(false))
    );
    assert_eq!(c["target_modules"].as_array().unwrap().len(), 2 * 7);
    // GPT-2's fused c_attn: all three parts (rank 9, alpha keeping the scale), or q alone
    let c = export_round_trip(model(tiny_gpt2(64), 4), TargetModules::default());
    assert_eq!(c["fan_in_fan_out"], true);
    assert_eq!(c["rank_pattern"][r"transformer\.h\.0\.attn\.c_attn"], 9, "{c}");
    assert_eq!(c["alpha_pattern"][r"transformer\.h\.0\.attn\.c_attn"], 18.0, "{c}");
    export_round_trip(model(tiny_gpt2(64), 4), names(&["attn.q", "mlp.proj"]));
    // GPT-NeoX's query_key_value in head groups
    export_round_trip(model(tiny_neox(64, true), 4), TargetModules::default());
    // Phi-3's fused qkv_proj and gate_up_proj
    let phi3 = CausalLm::load_pretrained(&fixture("hf-phi3-tiny"), &Cpu::default()).unwrap();
    export_round_trip(phi3.clone(), names(&["qkv_proj", "gate_up_proj", "o_proj"]));
    // DoRA: the magnitudes laid out as the modules' outputs; a fused module's part without an
    // update (GPT-2's k and v beside q) keeps its weight's norms
    let c = export_round_trip_with(model(tiny_llama(64), 4), TargetModules::default(), true);
    assert_eq!(c["use_dora"], true);
    export_round_trip_with(model(tiny_gpt2(64), 4), names(&["attn.q", "mlp.proj"]), true);
    export_round_trip_with(model(tiny_neox(64, true), 4), TargetModules::default(), true);
    export_round_trip_with(phi3, names(&["qkv_proj", "gate_up_proj"]), true);
}
