//! `rlhf-policies`: the language models that act as policies, references, critics and reward
//! models, on dfdx with runtime shapes.
//!
//! - [`ModelConfig`]: HF `config.json` for GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3
//!   (text), GPT-NeoX (Pythia), Phi-3, SmolLM3, Granite and OLMo 2, presets `tiny`/`small`.
//! - [`CausalLm`]: the training forward (dfdx ops and tape), [`ScalarHead`] for values/rewards,
//!   the parameter walker, [`AdamW`] and [`clip_grad_norm`], [`CausalLm::frozen_copy`].
//! - [`InferenceModel`]: a tape-free, KV-cached forward for rollouts, pinned to the training
//!   forward by tests; [`generate`] samples with temperature / top-k / top-p.
//! - [`checkpoint`]: HF folders (`config.json`, `model.safetensors`, `tokenizer.json`).
//! - [`Tokenizer`]: any `tokenizer.json`, BPE training, character level.
//!
//! ```
//! use rlhf_policies::{CausalLm, ModelConfig, Batch};
//! use dfdx::prelude::*;
//! let dev = Cpu::default();
//! let model = CausalLm::new(ModelConfig::gpt2_preset(64, 32, 2, 2, 16), &dev, 0).unwrap();
//! let batch = Batch::unpadded(&[vec![1, 2, 3]]).unwrap();
//! let logits = model.forward(&batch, NoneTape).unwrap();
//! assert_eq!(*logits.shape(), (3, 64));
//! ```
#![deny(missing_docs)]

pub mod attention;
pub mod batch;
pub mod block;
pub mod chat;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_engine;
mod decode_attn;
pub mod device_decode;
pub mod dims;
pub mod dora;
pub mod embed;
pub mod error;
mod forward_ctx;
pub mod freeze;
pub mod fused;
pub mod gelu;
pub mod gemma2;
pub mod gemma3;
pub mod gguf;
mod gguf_gemma;
mod gguf_names;
mod gguf_neox;
pub mod gguf_quants;
pub mod gguf_tokenizer;
pub mod gpt2;
pub mod gpt_neox;
pub mod granite;
pub mod half;
pub mod heads;
mod hf_names;
pub mod infer;
pub mod kernels;
pub mod layer_norm;
pub mod linear;
pub mod logprobs;
pub mod longrope;
pub mod lora;
pub mod model;
pub mod nucleus;
pub mod olmo2;
pub mod olmo3;
pub mod optim;
pub mod params;
pub mod peft;
pub mod peft_export;
pub mod phi3;
pub mod reward_model;
pub mod rope;
pub mod sampling;
pub mod session;
#[cfg(target_arch = "x86_64")]
mod sgemm;
pub mod smollm3;
pub mod softcap;
mod strided;
pub mod tokenizer;
pub mod yarn;

pub use batch::Batch;
pub use config::{Dims, Family, ModelConfig};
pub use device_decode::{DeviceKv, DeviceSession};
pub use error::PolicyError;
pub use fused::FusedOps;
pub use heads::ScalarHead;
pub use infer::{InferenceModel, KvCache, LogitsAt};
pub use kernels::WeightDtype;
pub use model::CausalLm;
pub use nucleus::{nucleus_mask, Nucleus, NucleusMaskedSession, RowLogits, TokenMask};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, GradBuffers};
pub use params::{HasParams, ParamMut, ParamRef};
pub use reward_model::{LearnedReward, Retokenized, RewardNormalization};
pub use sampling::{
    filtered_logprobs, generate, generate_from, generate_from_with, generate_observed, sample_from_logits, Decode,
    Generation, SamplingConfig,
};
pub use session::{
    logits_sessions, nucleus_masked_session, policy_session, policy_sessions, EngineSession, PolicySnapshot,
    RolloutEngine, RowEngine,
};
pub use tokenizer::Tokenizer;

/// The training path's matrix product `c (m×n, row-major) = a · b` on the current rayon pool
/// (every fused training op's gemm goes through it): `a` is `m×k`, stored row-major or, with
/// `a_transposed`, as its `k×m` transpose; `b` likewise. Public for the `gemm` benchmark.
#[doc(hidden)]
pub fn training_gemm(
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (a, a_transposed): (&[f32], bool),
    (b, b_transposed): (&[f32], bool),
) {
    use strided::View;
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n, "training_gemm: shapes");
    let av = if a_transposed { View::rows(a, m).t() } else { View::rows(a, k) };
    let bv = if b_transposed { View::rows(b, k).t() } else { View::rows(b, n) };
    strided::gemm_into(c, (m, n, k), av, bv, 1.0, false, rayon::current_num_threads());
}
