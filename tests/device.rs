//! Device-generic tests: the same checks on every dfdx device this build has — `cpu::` always,
//! `cuda::` with `--features cuda` (on a machine with a GPU; `scripts/cuda/device-check.sh`
//! runs them there). Each compares the device against HF's reference outputs
//! (`shared/fixtures`) or the host engine, and against the CPU, within the fixtures' 1e-4.
//! In `cpu::` the "against the CPU" halves compare the CPU with itself and cannot fail: there
//! they only run the generic code; their independent checks are the references, the falling
//! loss and the first minibatch's ratio of 1. `rollout_engines_agree` is CPU-only; `fused::`
//! (CUDA builds) checks the fused CUDA engine against the host engine.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf::stages::common::optimizer_step;
use rlhf::stages::pretrain::lm_loss;
use rlhf_policies::{
    generate, AdamW, AdamWConfig, Batch, CausalLm, DeviceKv, DeviceSession, EngineSession, FusedOps, GradBuffers,
    InferenceModel, KvCache, LogitsAt, RowEngine, SamplingConfig, TokenMask,
};

const ATOL: f32 = 1e-4;

fn load<D: FusedOps>(name: &str, dev: &D) -> CausalLm<D> {
    CausalLm::load_pretrained(&fixture(name), dev).expect("fixture loads")
}

/// Logits of every fixture text on `dev`: within 1e-4 of transformers' and of the CPU's.
fn fixture_logits<D: FusedOps>(name: &str, dev: &D) {
    let exp = read_json(&fixture(name).join("expected.json"));
    let (model, cpu) = (load(name, dev), load(name, &Cpu::default()));
    for text in exp["texts"].as_array().unwrap() {
        let batch = Batch::unpadded(&[u32s(&text["ids"])]).unwrap();
        let got = model.forward(&batch, NoneTape).unwrap().as_vec();
        let want = f32s_2d(&text["logits"]).concat();
        let on_cpu = cpu.forward(&batch, NoneTape).unwrap().as_vec();
        assert!(max_abs_diff(&got, &want) < ATOL, "{name}: logits vs transformers: {}", max_abs_diff(&got, &want));
        assert!(max_abs_diff(&got, &on_cpu) < ATOL, "{name}: logits vs CPU: {}", max_abs_diff(&got, &on_cpu));
    }
}

/// The left-padded batch (masks, derived positions): last-position logits within 1e-4 of
/// transformers'.
fn left_padded<D: FusedOps>(name: &str, dev: &D) {
    let exp = read_json(&fixture(name).join("expected.json"));
    let model = load(name, dev);
    let bp = &exp["batch_left_padded"];
    let ids = u32s_2d(&bp["input_ids"]);
    let mask: Vec<u8> = u32s_2d(&bp["attention_mask"]).concat().iter().map(|&m| m as u8).collect();
    let (b, t, v) = (ids.len(), ids[0].len(), model.dims.vocab);
    let logits = model.forward(&Batch::new(ids.concat(), mask, b, t).unwrap(), NoneTape).unwrap().as_vec();
    for (r, want) in f32s_2d(&bp["last_logits"]).iter().enumerate() {
        let row = &logits[(r * t + t - 1) * v..(r * t + t) * v];
        assert!(max_abs_diff(row, want) < ATOL, "{name}: padded row {r}: {}", max_abs_diff(row, want));
    }
}

/// Packed rows (several fixture texts per row, [`Batch::packed`]) on `dev`: each text's logits
/// within 1e-4 of its own unpacked forward on the CPU.
fn packed_rows<D: FusedOps>(name: &str, dev: &D) {
    let exp = read_json(&fixture(name).join("expected.json"));
    let (model, cpu) = (load(name, dev), load(name, &Cpu::default()));
    let texts: Vec<Vec<u32>> = exp["texts"].as_array().unwrap().iter().map(|t| u32s(&t["ids"])).collect();
    let rows: Vec<Vec<&[u32]>> = vec![texts.iter().map(Vec::as_slice).collect(), vec![&texts[0]]];
    let batch = Batch::packed(&rows, 0).unwrap();
    let (t, v) = (batch.t, model.dims.vocab);
    let got = model.forward(&batch, NoneTape).unwrap().as_vec();
    for (r, row) in rows.iter().enumerate() {
        let mut col = 0;
        for ids in row {
            let alone = cpu.forward(&Batch::unpadded(&[ids.to_vec()]).unwrap(), NoneTape).unwrap().as_vec();
            let at = (r * t + col) * v;
            let diff = max_abs_diff(&got[at..at + ids.len() * v], &alone);
            assert!(diff < ATOL, "{name}: packed row {r}, column {col}: {diff}");
            col += ids.len();
        }
    }
}

/// Three optimizer steps (LM loss, clipping at 0.5 so the clip path runs, AdamW with decay) on
/// `dev` and on the CPU: the same losses, gradient norms and weights.
fn train_steps<D: FusedOps + GradBuffers>(name: &str, dev: &D) {
    train_steps_with(name, dev, None)
}

/// [`train_steps`] training a LoRA (or DoRA) update of every linear layer instead: the merged
/// weights after three steps agree.
fn lora_train_steps<D: FusedOps + GradBuffers>(name: &str, dev: &D) {
    for use_dora in [false, true] {
        let lora = rlhf_policies::lora::LoraConfig { r: 4, lora_alpha: 8.0, use_dora, ..Default::default() };
        train_steps_with(name, dev, Some(lora));
    }
}

fn train_steps_with<D: FusedOps + GradBuffers>(name: &str, dev: &D, lora: Option<rlhf_policies::lora::LoraConfig>) {
    let lora = &lora;
    fn run<E: FusedOps + GradBuffers>(
        name: &str,
        dev: &E,
        lora: &Option<rlhf_policies::lora::LoraConfig>,
    ) -> (Vec<(f32, f64)>, Vec<f32>) {
        let mut model = load(name, dev);
        if let Some(l) = lora {
            model.add_lora(l, 7).unwrap();
        }
        // ε 1e-5, not 1e-8: a gradient that is zero in exact arithmetic (GPT-2's key bias:
        // softmax ignores a shift shared by all keys) is rounding noise of ~1e-9 whose sign
        // differs between devices, and Adam would scale it up to ±lr
        let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.1, eps: 1e-5, lora: lora.clone(), ..Default::default() };
        let mut opt = AdamW::new(cfg);
        let v = model.dims.vocab as u32;
        let seqs: Vec<Vec<u32>> = (0..3).map(|r| (0..9).map(|i| (r * 7 + i * 5) % v).collect()).collect();
        let inputs: Vec<Vec<u32>> = seqs.iter().map(|s| s[..8].to_vec()).collect();
        let targets: Vec<usize> = seqs.iter().flat_map(|s| s[1..].iter().map(|&x| x as usize)).collect();
        let steps = (0..3)
            .map(|_| {
                optimizer_step(&mut model, &mut opt, 1e-3, 0.5, 1, |m, _, tape| lm_loss(m, &inputs, &targets, tape))
                    .unwrap()
            })
            .collect();
        let weights = model.to_hf_tensors().into_values().flat_map(|t| t.data).collect();
        (steps, weights)
    }
    let (steps, weights) = run(name, dev, lora);
    let (cpu_steps, cpu_weights) = run(name, &Cpu::default(), lora);
    for (i, ((l, n), (cl, cn))) in steps.iter().zip(&cpu_steps).enumerate() {
        assert!((l - cl).abs() < ATOL * cl.abs().max(1.0), "{name}: step {i} loss {l} vs CPU {cl}");
        assert!((n - cn).abs() < 1e-3 * cn.max(1.0), "{name}: step {i} grad norm {n} vs CPU {cn}");
    }
    assert!(steps[2].0 < steps[0].0, "{name}: the loss falls ({:?})", steps);
    let diff = max_abs_diff(&weights, &cpu_weights);
    assert!(diff < ATOL, "{name}: weights after three steps differ from the CPU's by {diff}");
}

/// PPO's per-token log-probs and entropies, and their gradient, on `dev` and on the CPU; and
/// NLPO's, over a mask of about half the vocabulary per row.
fn logprobs_and_entropy<D: FusedOps>(name: &str, dev: &D) {
    fn run<E: FusedOps>(name: &str, dev: &E, masked: bool) -> (Vec<f32>, Vec<f32>) {
        let model = load(name, dev);
        let v = model.dims.vocab as u32;
        let rows: Vec<Vec<u32>> = (0..2).map(|r| (0..6).map(|i| (r * 3 + i * 11 + 1) % v).collect()).collect();
        let targets: Vec<usize> = rows.iter().flat_map(|s| s.iter().map(|&x| (x as usize + 1) % v as usize)).collect();
        let h = model.forward_hidden(&Batch::unpadded(&rows).unwrap(), OwnedTape::default()).unwrap();
        let out = if masked {
            let masks: Vec<TokenMask> = (0..targets.len())
                .map(|i| {
                    let mut m = TokenMask::none(v as usize);
                    (0..v as usize).filter(|t| (t * 7 + i) % 3 != 0).for_each(|t| m.allow(t));
                    m.allow(targets[i]);
                    m
                })
                .collect();
            model.logprobs_and_entropy_masked(h, &targets, 0.7, &masks)
        } else {
            model.logprobs_and_entropy(h, &targets, 0.7)
        };
        let values = out.as_vec();
        let grads = out.sum::<Rank0, _>().backward();
        let g = grads.get(&model.wte).as_vec();
        (values, g)
    }
    for masked in [false, true] {
        let (values, grad) = run(name, dev, masked);
        let (cpu_values, cpu_grad) = run(name, &Cpu::default(), masked);
        assert!(max_abs_diff(&values, &cpu_values) < ATOL, "{name} (masked {masked}): log-probs/entropies vs CPU");
        assert!(max_abs_diff(&grad, &cpu_grad) < ATOL, "{name} (masked {masked}): embedding gradient vs CPU");
    }
}

/// The device's KV-cached decode ([`CausalLm::decode`]): a left-padded prompt batch, then
/// single columns, against the host engine's logits (1e-4).
/// A fixture's logits, KV-cached decode, decode session and train steps on `dev`.
fn every_check<D: FusedOps + GradBuffers>(name: &str, dev: &D) {
    fixture_logits(name, dev);
    decode_matches_engine(name, dev);
    device_session_matches_engine(name, dev);
    train_steps(name, dev);
}

fn decode_matches_engine<D: FusedOps>(name: &str, dev: &D) {
    let model = load(name, dev);
    let engine = InferenceModel::from_model(&load(name, &Cpu::default()));
    let v = model.dims.vocab as u32;
    let pad = vec![2, 0, 1];
    let prompt: Vec<u32> = (0..3 * 5).map(|i| if i % 5 < pad[i / 5] { 0 } else { (i as u32 * 7 + 3) % v }).collect();
    let mut kv = DeviceKv::new(model.dims.n_layer, pad.clone(), 9);
    let mut cache = KvCache::new(&model.dims, pad, 9);
    let got = model.decode(&mut kv, &prompt, 5, LogitsAt::All).unwrap();
    let want = engine.forward(&mut cache, &prompt, 5, LogitsAt::All).unwrap();
    // pad query rows are garbage on both sides: compare the real ones
    for (r, i) in [(0, 2), (0, 4), (1, 0), (1, 4), (2, 1), (2, 4)] {
        let row = |x: &[f32]| x[(r * 5 + i) * v as usize..(r * 5 + i + 1) * v as usize].to_vec();
        let diff = max_abs_diff(&row(&got), &row(&want));
        assert!(diff < ATOL, "{name}: prefill row {r} column {i} differs by {diff}");
    }
    for step in 0..4u32 {
        let next: Vec<u32> = (0..3).map(|r| (r * 13 + step * 5 + 1) % v).collect();
        let got = model.decode(&mut kv, &next, 1, LogitsAt::Last).unwrap();
        let want = engine.forward(&mut cache, &next, 1, LogitsAt::Last).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < ATOL, "{name}: decode step {step} differs by {diff}");
    }
}

/// `generate` through the device decode: greedy continuations equal transformers' (single
/// prompts and the left-padded batch), and sampling at temperature 1 draws the same tokens
/// with the same log-probs as the host engine from the same seed.
fn generate_on_device<D: FusedOps>(name: &str, dev: &D) {
    let exp = read_json(&fixture(name).join("expected.json"));
    let model = load(name, dev);
    let greedy = SamplingConfig { greedy: true, max_new_tokens: 20, ..Default::default() };
    for g in exp["greedy"].as_array().unwrap() {
        let out = generate(&model, &[u32s(&g["prompt_ids"])], 0, &greedy).unwrap();
        assert_eq!(out.tokens[0], u32s(&g["new_ids"]), "{name}: greedy continuation");
    }
    let gb = &exp["greedy_left_padded_batch"];
    let prompts: Vec<Vec<u32>> = gb["prompt_indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| u32s(&exp["texts"][i.as_u64().unwrap() as usize]["ids"]))
        .collect();
    let out = generate(&model, &prompts, 0, &greedy).unwrap();
    assert_eq!(out.tokens, u32s_2d(&gb["new_ids"]), "{name}: left-padded greedy batch");

    let sampled = SamplingConfig { max_new_tokens: 12, seed: 5, ..Default::default() };
    let engine = InferenceModel::from_model(&load(name, &Cpu::default()));
    let (got, want) =
        (generate(&model, &prompts, 0, &sampled).unwrap(), generate(&engine, &prompts, 0, &sampled).unwrap());
    assert_eq!(got.tokens, want.tokens, "{name}: sampled tokens");
    let diff = max_abs_diff(&got.logprobs.concat(), &want.logprobs.concat());
    assert!(diff < ATOL, "{name}: sampled log-probs differ by {diff}");
}

/// One PPO iteration of the benchmark's trainer at toy sizes (rollout on the host engine,
/// scoring and update on `dev`): the same metrics and weights as on the CPU, and the first
/// minibatch's ratio is 1.
fn ppo_iteration<D: FusedOps + GradBuffers>(shared_critic: bool, dev: &D) {
    let w = toy_workload();
    fn run<E: FusedOps + GradBuffers>(
        w: &rlhf::bench::Workload,
        shared: bool,
        dev: &E,
    ) -> (serde_json::Value, Vec<f32>) {
        let mut t = rlhf::bench_ppo::ppo_trainer(w, "toy", shared, dev).unwrap();
        let out = t.iteration(0).unwrap().expect("not skipped");
        (out.record, t.models.policy.to_hf_tensors().into_values().flat_map(|t| t.data).collect())
    }
    let (record, weights) = run(&w, shared_critic, dev);
    let (cpu_record, cpu_weights) = run(&w, shared_critic, &Cpu::default());
    let ratio = record["debug/first_minibatch_ratio"].as_f64().unwrap();
    assert!((ratio - 1.0).abs() < 1e-6, "first minibatch ratio {ratio}");
    for key in
        ["objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "val/ratio", "policy/entropy_avg"]
    {
        let (a, b) = (record[key].as_f64().unwrap(), cpu_record[key].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{key}: {a} vs CPU {b}");
    }
    let diff = max_abs_diff(&weights, &cpu_weights);
    assert!(diff < ATOL, "policy weights after one iteration differ from the CPU's by {diff}");
}

/// The env's policy on the device ([`DeviceSession`]) against the host engine's
/// ([`EngineSession`]): the same tokens and sampling log-probs from the same seed, with rows of
/// different prompt lengths and one row leaving early (it is fed pads from then on).
fn device_session_matches_engine<D: FusedOps>(name: &str, dev: &D) {
    use rlhf_envs::Policy;
    let model = load(name, dev);
    let engine = std::sync::Arc::new(InferenceModel::from_model(&load(name, &Cpu::default())));
    let sampling = SamplingConfig { temperature: 0.9, top_k: 20, seed: 11, ..Default::default() };
    let mut ours = DeviceSession::new(&model, 3, 16, sampling.clone());
    let mut theirs = EngineSession::new(engine, 3, 16, sampling);
    let prompts: [&[u32]; 3] = [&[5, 9, 2], &[7], &[3, 3, 8, 1]];
    ours.begin(&[0, 1, 2], &prompts).unwrap();
    theirs.begin(&[0, 1, 2], &prompts).unwrap();
    let mut active = vec![0, 1, 2];
    for step in 0..6 {
        let (a, b) = (ours.act(&active).unwrap(), theirs.act(&active).unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.token, y.token, "{name}: step {step} token");
            assert!(
                (x.logprob - y.logprob).abs() < ATOL,
                "{name}: step {step} log-prob {} vs {}",
                x.logprob,
                y.logprob
            );
        }
        let acted = active.clone();
        if step == 2 {
            active.retain(|&r| r != 1);
        }
        let tokens: Vec<u32> = active.iter().map(|r| a[acted.iter().position(|x| x == r).unwrap()].token).collect();
        ours.push(&active, &tokens).unwrap();
        theirs.push(&active, &tokens).unwrap();
    }
    assert!(ours.begin(&[1], &[&[4]]).is_err(), "a subset of rows cannot begin on the device session");
}

/// The pretrain stage (`device` in its config) on `kind` and on the CPU: the same losses at
/// every step, and checkpoints that load back.
fn pretrain_stage(kind: rlhf::device::DeviceKind) {
    use rlhf::stages::pretrain::{train, PretrainConfig};
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("c.txt");
    std::fs::write(&corpus, "to be or not to be, that is the question.\n".repeat(40)).unwrap();
    let run = |device, name: &str| {
        let cfg = PretrainConfig {
            out_dir: d.path().join(name),
            files: vec![corpus.clone()],
            model: rlhf_policies::ModelConfig::gpt2_preset(1, 32, 2, 2, 32),
            block_size: 16,
            batch_size: 4,
            steps: 4,
            eval_every: 2,
            eval_batches: 2,
            checkpoint_every: 2,
            sample_tokens: 5,
            device,
            ..Default::default()
        };
        train(cfg, false).unwrap();
        std::fs::read_to_string(d.path().join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let (ours, cpu) = (run(kind, "dev"), run(rlhf::device::DeviceKind::Cpu, "cpu"));
    assert_eq!(ours.len(), 4);
    for (a, b) in ours.iter().zip(&cpu) {
        for key in ["loss", "grad_norm", "val_loss"] {
            if let (Some(x), Some(y)) = (a[key].as_f64(), b[key].as_f64()) {
                assert!((x - y).abs() < 1e-4 * y.abs().max(1.0), "step {}: {key} {x} vs CPU {y}", a["step"]);
            }
        }
    }
    let (model, _) =
        rlhf_policies::checkpoint::load_with_tokenizer(&d.path().join("dev/checkpoints/step-4"), &Cpu::default())
            .unwrap();
    assert_eq!(model.dims.n_layer, 2);
}

/// The PPO stage on `kind` with held-out evaluation: the 3 held-out prompts are one chunk
/// narrower than the 4 rollout rows (the device decode begins a session of its own for it),
/// every evaluation runs, and before the first update the policy is the reference, so the
/// sampled KL is 0.
fn ppo_stage_evaluates(kind: rlhf::device::DeviceKind) {
    use rlhf::stages::ppo::{train, PpoConfig};
    use rlhf::stages::reward_spec::RewardSpec;
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = pretrained_policy(d.path());
    let cfg = PpoConfig {
        out_dir: d.path().join("ppo"),
        policy,
        prompts,
        reward: Some(RewardSpec::Keywords { keywords: vec!["a".into()], weight: 1.0 }),
        value_model: rlhf::stages::ppo_models::ValueModelConfig::Shared {},
        batch_size: 4,
        minibatch_size: 4,
        ppo_epochs: 1,
        max_new_tokens: 6,
        max_prompt_len: 16,
        iterations: 2,
        val_fraction: 0.5,
        eval_every: 1,
        checkpoint_every: 2,
        device: kind,
        ..Default::default()
    };
    let report = train(cfg, false).unwrap();
    let steps: Vec<u64> = report.evaluations.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 1, 2]);
    let kl = report.evaluations[0]["eval/kl"].as_f64().unwrap();
    assert!(kl.abs() < 1e-6, "the policy is the reference before the first update: KL {kl}");
    assert!(report.evaluations.iter().all(|e| e["eval/response_length"].as_f64().unwrap() > 0.0));
}

/// The peer workload with a toy model (`toy`) and toy PPO / GRPO shapes.
fn toy_workload() -> rlhf::bench::Workload {
    let mut v = read_json(&shared().join("peers/workload.json"));
    v["models"]["toy"] = serde_json::json!({
        "architecture": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2,
        "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0
    });
    for (k, n) in [("batch", 4), ("minibatch_size", 2), ("prompt_len", 5), ("response_len", 6)] {
        v["ppo"][k] = n.into();
    }
    v["ppo"]["eps"] = 1e-5.into(); // see train_steps: rounding-noise gradients stay small
    for (k, n) in [("prompts_per_step", 2), ("num_generations", 2), ("prompt_len_words", 5)] {
        v["trl_grpo"][k] = n.into();
    }
    for (k, n) in [("max_completion_length", 6), ("per_device_train_batch_size", 2)] {
        v["trl_grpo"][k] = n.into();
    }
    serde_json::from_value(v).unwrap()
}

/// A CPU PPO iteration on the toy workload with its rollout decoded by `engine` gives the
/// host engine's metrics (the same samples).
fn ppo_rollout_matches_host(engine: rlhf_policies::RolloutEngine) {
    let (w, dev) = (toy_workload(), Cpu::default());
    let ppo = |engine| {
        let mut t = rlhf::bench_ppo::ppo_trainer(&w, "toy", true, &dev).unwrap();
        t.cfg.rollout_engine = engine;
        t.iteration(0).unwrap().expect("not skipped").record
    };
    let (ours, host) = (ppo(engine), ppo(rlhf_policies::RolloutEngine::Host));
    for key in ["objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "val/ratio"] {
        let (a, b) = (ours[key].as_f64().unwrap(), host[key].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "ppo {engine:?} {key}: {a} vs {b}");
    }
}

/// On the CPU, PPO and GRPO iterations with the rollout decoded by the model itself
/// (`rollout_engine: device`, the GPU's path) and by the host engine: the same samples, so the
/// same metrics.
#[test]
fn rollout_engines_agree() {
    use rlhf_policies::RolloutEngine;
    ppo_rollout_matches_host(RolloutEngine::Device);
    let (w, dev) = (toy_workload(), Cpu::default());
    let algo = rlhf::stages::grpo::Algo::Grpo { scale_rewards: Default::default(), std_eps: 1e-4 };
    let grpo = |engine| {
        let mut t = rlhf::bench_grpo::grpo_trainer(&w, "toy", algo, &dev).unwrap();
        t.cfg.rollout_engine = engine;
        let out = t.iteration(0).unwrap().expect("not skipped");
        (out.episodes.iter().map(|e| e.response_ids.clone()).collect::<Vec<_>>(), out.record)
    };
    let ((ours_ids, ours), (host_ids, host)) = (grpo(RolloutEngine::Device), grpo(RolloutEngine::Host));
    assert_eq!(ours_ids, host_ids, "grpo: the same completions (groups share a prompt)");
    for key in ["reward", "kl"] {
        let (a, b) = (ours[key].as_f64().unwrap(), host[key].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "grpo {key}: {a} vs {b}");
    }
}

/// A script of row-engine calls, returning every call's logits: rows 0 and 2 prefilled as one
/// left-padded batch (all positions), row 1 copied from row 0, single tokens on rows [2, 1]
/// and [0] in turn, then two columns at once on row 0.
fn drive<E: RowEngine>(e: &E) -> Vec<Vec<f32>> {
    let v = e.dims().vocab as u32;
    let ids = |k: u32, n: u32| (0..n).map(|i| (k * 13 + i * 7 + 1) % v).collect::<Vec<u32>>();
    let mut cache = e.row_cache(3, 16);
    let mut out = vec![];
    e.reset_row(&mut cache, 0, 0);
    e.reset_row(&mut cache, 2, 2);
    let prompts = [ids(1, 6), vec![0, 0], ids(2, 4)].concat();
    out.push(e.forward_rows(&mut cache, &[0, 2], &prompts, 6, LogitsAt::All).unwrap());
    e.copy_row(&mut cache, 0, 1).unwrap();
    for step in 0..3 {
        let pair = [(step * 5 + 3) % v, (step * 11 + 2) % v];
        out.push(e.forward_rows(&mut cache, &[2, 1], &pair, 1, LogitsAt::Last).unwrap());
        out.push(e.forward_rows(&mut cache, &[0], &[(step * 3 + 9) % v], 1, LogitsAt::Last).unwrap());
    }
    out.push(e.forward_rows(&mut cache, &[0], &ids(4, 2), 2, LogitsAt::All).unwrap());
    out
}

/// [`drive`]'s left-padded row on the host engine equals the same four tokens prefilled alone:
/// padding and the other rows of the batch change nothing.
#[test]
fn host_engine_padded_row_matches_alone() {
    let host = InferenceModel::from_model(&load("hf-gpt2-tiny", &Cpu::default()));
    let v = host.dims.vocab;
    let first = &drive(&host)[0];
    let ids: Vec<u32> = (0..4).map(|i| (2 * 13 + i * 7 + 1) % v as u32).collect();
    let mut cache = host.row_cache(1, 16);
    let alone = RowEngine::forward_rows(&host, &mut cache, &[0], &ids, 4, LogitsAt::All).unwrap();
    let diff = max_abs_diff(&first[(6 + 2) * v..12 * v], &alone);
    assert!(diff < ATOL, "the padded row differs from the same tokens alone by {diff}");
}

/// The fused CUDA engine against the host engine: the same logits (1e-4) through [`drive`],
/// the same greedy generation, and a PPO iteration with `rollout_engine: fused` that samples
/// what the host engine samples.
#[cfg(feature = "cuda")]
mod fused {
    use super::*;
    use rlhf_policies::cuda_engine::CudaEngine;

    fn engine_matches_host(name: &str) {
        let model = load(name, &Cpu::default());
        let (host, fused) = (InferenceModel::from_model(&model), CudaEngine::from_model(&model).unwrap());
        let (want, got) = (drive(&host), drive(&fused));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "{name}: call {i}: logits length");
            let diff = max_abs_diff(g, w);
            assert!(diff < ATOL, "{name}: call {i}: fused logits differ from the host engine's by {diff}");
        }
        let prompts = vec![vec![5, 9, 2], vec![7]];
        let cfg = SamplingConfig { greedy: true, max_new_tokens: 8, ..Default::default() };
        let (a, b) = (generate(&fused, &prompts, 0, &cfg).unwrap(), generate(&host, &prompts, 0, &cfg).unwrap());
        assert_eq!(a.tokens, b.tokens, "{name}: greedy tokens");
    }

    #[test]
    fn gpt2_fused_engine_matches_host() {
        engine_matches_host("hf-gpt2-tiny");
    }

    #[test]
    fn llama_fused_engine_matches_host() {
        engine_matches_host("hf-llama-tiny");
    }

    #[test]
    fn qwen2_fused_engine_matches_host() {
        engine_matches_host("hf-qwen2-tiny");
    }

    #[test]
    fn llama3_fused_engine_matches_host() {
        engine_matches_host("hf-llama3-tiny");
    }

    #[test]
    fn ppo_fused_rollout_matches_host() {
        ppo_rollout_matches_host(rlhf_policies::RolloutEngine::Fused);
    }
}

macro_rules! device_tests {
    ($m:ident, $dev:expr, $kind:expr) => {
        mod $m {
            use super::*;
            #[test]
            fn pretrain_stage_matches_cpu() {
                pretrain_stage($kind);
            }
            #[test]
            fn gpt2_fixture_logits() {
                fixture_logits("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_fixture_logits() {
                fixture_logits("hf-llama-tiny", &$dev);
            }
            #[test]
            fn qwen2_fixture_logits_decode_session_and_train_steps() {
                every_check("hf-qwen2-tiny", &$dev);
            }
            #[test]
            fn qwen3_fixture_logits_decode_session_and_train_steps() {
                every_check("hf-qwen3-tiny", &$dev);
                every_check("hf-qwen3-yarn-tiny", &$dev);
            }
            #[test]
            fn gemma3_fixture_logits_decode_session_train_steps_and_generate() {
                every_check("hf-gemma3-tiny", &$dev);
                // greedy continuations 20 tokens past prompts of 28-33, window 8
                generate_on_device("hf-gemma3-tiny", &$dev);
            }
            #[test]
            fn gemma2_fixture_soft_caps_logits_decode_session_train_steps_and_generate() {
                every_check("hf-gemma2-tiny", &$dev);
                generate_on_device("hf-gemma2-tiny", &$dev);
            }
            #[test]
            fn granite_fixture_multipliers_logits_decode_session_train_steps_and_generate() {
                every_check("hf-granite-tiny", &$dev);
                generate_on_device("hf-granite-tiny", &$dev);
            }
            #[test]
            fn olmo2_fixture_post_norms_logits_decode_session_train_steps_and_generate() {
                every_check("hf-olmo2-tiny", &$dev);
                generate_on_device("hf-olmo2-tiny", &$dev);
                every_check("hf-olmo3-tiny", &$dev);
                generate_on_device("hf-olmo3-tiny", &$dev);
            }
            #[test]
            fn gpt_neox_fixtures_logits_decode_session_train_steps_and_generate() {
                for name in ["hf-pythia-tiny", "hf-gpt-neox-seq-tiny"] {
                    every_check(name, &$dev);
                    generate_on_device(name, &$dev);
                }
            }
            #[test]
            fn phi3_fixtures_logits_decode_session_train_steps_and_generate() {
                for name in ["hf-phi3-tiny", "hf-phi4-mini-tiny"] {
                    every_check(name, &$dev);
                    generate_on_device(name, &$dev);
                }
            }
            #[test]
            fn smollm3_fixture_logits_decode_session_train_steps_and_generate() {
                every_check("hf-smollm3-tiny", &$dev);
                generate_on_device("hf-smollm3-tiny", &$dev);
            }
            #[test]
            fn mistral_sliding_window_decode_and_generate() {
                decode_matches_engine("hf-mistral-tiny", &$dev);
                generate_on_device("hf-mistral-tiny", &$dev);
            }
            #[test]
            fn llama3_fixture_logits_decode_and_session() {
                fixture_logits("hf-llama3-tiny", &$dev);
                decode_matches_engine("hf-llama3-tiny", &$dev);
                device_session_matches_engine("hf-llama3-tiny", &$dev);
            }
            #[test]
            fn gpt2_left_padded() {
                left_padded("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_left_padded() {
                left_padded("hf-llama-tiny", &$dev);
            }
            #[test]
            fn gpt2_packed_rows_match_cpu() {
                packed_rows("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_packed_rows_match_cpu() {
                packed_rows("hf-llama-tiny", &$dev);
            }
            #[test]
            fn gpt2_train_steps_match_cpu() {
                train_steps("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_train_steps_match_cpu() {
                train_steps("hf-llama-tiny", &$dev);
            }
            #[test]
            fn lora_and_dora_train_steps_match_cpu() {
                lora_train_steps("hf-llama-tiny", &$dev);
                lora_train_steps("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn gpt2_logprobs_and_entropy_match_cpu() {
                logprobs_and_entropy("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_logprobs_and_entropy_match_cpu() {
                logprobs_and_entropy("hf-llama-tiny", &$dev);
            }
            #[test]
            fn gpt2_decode_matches_engine() {
                decode_matches_engine("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_decode_matches_engine() {
                decode_matches_engine("hf-llama-tiny", &$dev);
            }
            #[test]
            fn gpt2_generate_on_device() {
                generate_on_device("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_generate_on_device() {
                generate_on_device("hf-llama-tiny", &$dev);
            }
            #[test]
            fn gpt2_device_session_matches_engine() {
                device_session_matches_engine("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_device_session_matches_engine() {
                device_session_matches_engine("hf-llama-tiny", &$dev);
            }
            #[test]
            fn ppo_stage_evaluates_held_out_prompts() {
                ppo_stage_evaluates($kind);
            }
            #[test]
            fn ppo_iteration_shared_critic_matches_cpu() {
                ppo_iteration(true, &$dev);
            }
            #[test]
            fn ppo_iteration_separate_critic_matches_cpu() {
                ppo_iteration(false, &$dev);
            }
        }
    };
}

device_tests!(cpu, Cpu::default(), rlhf::device::DeviceKind::Cpu);
#[cfg(feature = "cuda")]
device_tests!(cuda, rlhf::device::cuda(0).expect("a CUDA device"), rlhf::device::DeviceKind::Cuda);
