//! The model core in one page: a character-level tokenizer, a small GPT-2, a few AdamW steps
//! of next-token cross-entropy on one sentence, then sampling from the KV-cache engine.
//!
//! `cargo run --release --example 01_overfit_and_sample` (a few seconds on 2 cores).

use anyhow::Result;
use dfdx::prelude::*;
use rlhf_policies::{
    clip_grad_norm, generate, AdamW, AdamWConfig, Batch, CausalLm, InferenceModel, ModelConfig, SamplingConfig,
    Tokenizer,
};

fn main() -> Result<()> {
    let text = "the quick brown fox jumps over the lazy dog. ";
    let tok = Tokenizer::char_level(text)?;
    let ids = tok.encode(&text.repeat(3))?;
    let dev = Cpu::default();
    let mut model = CausalLm::new(ModelConfig::gpt2_preset(tok.vocab_size(), 64, 2, 4, 256), &dev, 0)?;
    let mut opt = AdamW::new(AdamWConfig { lr: 3e-3, ..Default::default() });

    // inputs are ids[..n-1], targets ids[1..]
    let (x, y): (Vec<u32>, Vec<usize>) =
        (ids[..ids.len() - 1].to_vec(), ids[1..].iter().map(|&t| t as usize).collect());
    let batch = Batch::unpadded(&[x])?;
    for step in 0..60 {
        let logits = model.forward(&batch, OwnedTape::<f32, Cpu>::default())?;
        let n = y.len();
        let loss = logits.log_softmax::<Axis<1>>().select(dev.tensor_from_vec(y.clone(), (n,))).mean().negate();
        let value = loss.array();
        let mut grads = loss.backward();
        clip_grad_norm(&model.params(), &mut grads, 1.0)?;
        opt.step(model.params_mut(), &mut grads, 3e-3)?;
        if step % 10 == 0 {
            println!("step {step:>2}  loss {value:.3}");
        }
    }

    let engine = InferenceModel::from_model(&model);
    let prompt = tok.encode("the quick")?;
    let cfg = SamplingConfig { max_new_tokens: 40, temperature: 0.5, seed: 1, ..Default::default() };
    let out = generate(&engine, &[prompt], 0, &cfg)?;
    println!("sample: the quick{}", tok.decode(&out.tokens[0])?);
    Ok(())
}
