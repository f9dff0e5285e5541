//! `rlhf export`: any model rlhf reads, written as a plain HF folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`) that transformers and every stage load as it is — a
//! PEFT adapter merged into its base (PEFT's `merge_and_unload()` and `save_pretrained`), a
//! GGUF file dequantised to f32 with its vocabulary and chat template, or a run's newest
//! checkpoint; a reward model keeps its head and normalisation.

use std::path::PathBuf;

use anyhow::{bail, Result};
use dfdx::prelude::Cpu;
use rlhf_policies::checkpoint::{load_with_tokenizer, tokenizer_dir, WeightDtype};
use rlhf_policies::{LearnedReward, Tokenizer};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The model: a model folder, a PEFT adapter folder (merged into its base), a GGUF file
    /// (dequantised to f32), or a run folder (its newest checkpoint); a causal LM or a reward
    /// model.
    #[arg(long)]
    pub model: PathBuf,
    /// The folder to write (it must not hold a model already).
    #[arg(long)]
    pub out: PathBuf,
    /// The weights' number format: f32 (exact), bf16 or f16 (half the size, rounded to
    /// nearest even; `torch_dtype` in config.json says which).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

/// `--dtype` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

pub fn export_cmd(a: ExportArgs) -> Result<()> {
    let src = rlhf::run::resolve_model(&a.model)?;
    if ["config.json", "model.safetensors", "adapter_config.json"].iter().any(|f| a.out.join(f).exists()) {
        bail!("{}: already holds a model; give --out a new folder", a.out.display());
    }
    let dtype = match a.dtype {
        Dtype::F32 => WeightDtype::F32,
        Dtype::Bf16 => WeightDtype::Bf16,
        Dtype::F16 => WeightDtype::F16,
    };
    let dev = Cpu::default();
    let what = if rlhf::eval::is_reward_model(&src)? {
        let (rm, norm) = LearnedReward::load_pretrained(&src, &dev)?;
        let tok = Tokenizer::from_file(&tokenizer_dir(&src)?.join("tokenizer.json"))?;
        rm.save_pretrained_as(&a.out, Some(&tok), norm.as_ref(), dtype)?;
        let with = if norm.is_some() { ", with its normalisation" } else { "" };
        format!("a reward model of {} parameters{with}", count(&rm.model) + rm.model.dims.d_model)
    } else {
        let (lm, tok) = load_with_tokenizer(&src, &dev)?;
        lm.save_pretrained_as(&a.out, Some(&tok), dtype)?;
        let family = serde_json::to_value(&lm.config)?["model_type"].as_str().unwrap_or("").to_string();
        format!("a {family} causal LM of {} parameters", count(&lm))
    };
    println!("{}: {what} in {}, from {}", a.out.display(), dtype.torch_name(), src.display());
    Ok(())
}

fn count(m: &rlhf_policies::CausalLm<Cpu>) -> usize {
    m.params().iter().map(|(_, p)| p.len()).sum()
}
