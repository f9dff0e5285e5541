//! Device-generic tests: the same checks on every dfdx device this build has — `cpu::` always,
//! `cuda::` with `--features cuda` (on a machine with a GPU; `scripts/cuda/device-check.sh`
//! runs them there). Each compares the device against HF's reference outputs
//! (`shared/fixtures`) and against the CPU, within the fixtures' 1e-4.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf::stages::common::optimizer_step;
use rlhf::stages::pretrain::lm_loss;
use rlhf_policies::{AdamW, AdamWConfig, Batch, CausalLm, FusedOps, GradBuffers};

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

/// Three optimizer steps (LM loss, clipping at 0.5 so the clip path runs, AdamW with decay) on
/// `dev` and on the CPU: the same losses, gradient norms and weights.
fn train_steps<D: FusedOps + GradBuffers>(name: &str, dev: &D) {
    fn run<E: FusedOps + GradBuffers>(name: &str, dev: &E) -> (Vec<(f32, f64)>, Vec<f32>) {
        let mut model = load(name, dev);
        let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.1, ..Default::default() };
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
    let (steps, weights) = run(name, dev);
    let (cpu_steps, cpu_weights) = run(name, &Cpu::default());
    for (i, ((l, n), (cl, cn))) in steps.iter().zip(&cpu_steps).enumerate() {
        assert!((l - cl).abs() < ATOL * cl.abs().max(1.0), "{name}: step {i} loss {l} vs CPU {cl}");
        assert!((n - cn).abs() < 1e-3 * cn.max(1.0), "{name}: step {i} grad norm {n} vs CPU {cn}");
    }
    assert!(steps[2].0 < steps[0].0, "{name}: the loss falls ({:?})", steps);
    let diff = max_abs_diff(&weights, &cpu_weights);
    assert!(diff < ATOL, "{name}: weights after three steps differ from the CPU's by {diff}");
}

/// PPO's per-token log-probs and entropies, and their gradient, on `dev` and on the CPU.
fn logprobs_and_entropy<D: FusedOps>(name: &str, dev: &D) {
    fn run<E: FusedOps>(name: &str, dev: &E) -> (Vec<f32>, Vec<f32>) {
        let model = load(name, dev);
        let v = model.dims.vocab as u32;
        let rows: Vec<Vec<u32>> = (0..2).map(|r| (0..6).map(|i| (r * 3 + i * 11 + 1) % v).collect()).collect();
        let targets: Vec<usize> = rows.iter().flat_map(|s| s.iter().map(|&x| (x as usize + 1) % v as usize)).collect();
        let h = model.forward_hidden(&Batch::unpadded(&rows).unwrap(), OwnedTape::default()).unwrap();
        let out = model.logprobs_and_entropy(h, &targets, 0.7);
        let values = out.as_vec();
        let grads = out.sum::<Rank0, _>().backward();
        let g = grads.get(&model.wte).as_vec();
        (values, g)
    }
    let (values, grad) = run(name, dev);
    let (cpu_values, cpu_grad) = run(name, &Cpu::default());
    assert!(max_abs_diff(&values, &cpu_values) < ATOL, "{name}: log-probs/entropies vs CPU");
    assert!(max_abs_diff(&grad, &cpu_grad) < ATOL, "{name}: embedding gradient vs CPU");
}

macro_rules! device_tests {
    ($m:ident, $dev:expr) => {
        mod $m {
            use super::*;
            #[test]
            fn gpt2_fixture_logits() {
                fixture_logits("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_fixture_logits() {
                fixture_logits("hf-llama-tiny", &$dev);
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
            fn gpt2_train_steps_match_cpu() {
                train_steps("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_train_steps_match_cpu() {
                train_steps("hf-llama-tiny", &$dev);
            }
            #[test]
            fn gpt2_logprobs_and_entropy_match_cpu() {
                logprobs_and_entropy("hf-gpt2-tiny", &$dev);
            }
            #[test]
            fn llama_logprobs_and_entropy_match_cpu() {
                logprobs_and_entropy("hf-llama-tiny", &$dev);
            }
        }
    };
}

device_tests!(cpu, Cpu::default());
#[cfg(feature = "cuda")]
device_tests!(cuda, rlhf::device::cuda(0).expect("a CUDA device"));
