//! Learned reward models: a transformer backbone with a scalar `score` head read at the last
//! real token of prompt + response — transformers' `*ForSequenceClassification` with
//! `num_labels = 1` — plus its normalisation and its checkpoint folder.
//!
//! The head has **no trained bias**: Bradley–Terry only sees score differences, so a bias gets
//! no gradient from it, and transformers' `score` layer has none (a saved `score.bias` would be
//! dropped on load there, huggingface/trl#1783). Offsets are the job of the stored
//! normalisation `r' = g·r + b` (lm-human-preferences), written into `config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use rlhf_envs::{EnvError, RewardInput, RewardModel, ScoreNorm};
use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::checkpoint::{write_atomic, write_safetensors_as, HostTensor, WeightDtype};
use crate::config::ModelConfig;
use crate::error::PolicyError;
use crate::fused::FusedOps;
use crate::heads::ScalarHead;
use crate::model::CausalLm;
use crate::params::{HasParams, ParamMut, ParamRef};
use crate::tokenizer::Tokenizer;

/// Key of the normalisation block in a reward model's `config.json`.
pub const NORMALIZATION_KEY: &str = "reward_normalization";

/// The file of a reward model's PEFT adapter folder holding its normalisation (the adapter has
/// no `config.json` of its own).
pub const ADAPTER_NORMALIZATION: &str = "reward_normalization.json";

/// A learned reward model: a transformer backbone and a scalar head read at the last token of
/// prompt + response, optionally normalised (`(r − mean) / std`).
#[derive(Debug)]
pub struct LearnedReward<D: Device<f32>> {
    /// Backbone. It never reads its LM head: the constructors and the loader drop an untied one
    /// ([`LearnedReward::with_head`]), and the checkpoint leaves it out either way.
    pub model: CausalLm<D>,
    /// Score head.
    pub head: ScalarHead<D>,
    /// Optional normalisation applied to every score.
    pub norm: Option<ScoreNorm>,
    /// Pad id for batching.
    pub pad_id: u32,
}

/// Scores are shifted and scaled to a target mean and std measured on a reference set:
/// `r' = gain·r + bias` with `gain = σ_T/σ_D`, `bias = μ_T − gain·μ_D` (lm-human-preferences).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardNormalization {
    /// Mean of the raw scores on the reference set, μ_D.
    pub mean: f32,
    /// Standard deviation of the raw scores on the reference set, σ_D.
    pub std: f32,
    /// Wanted mean, μ_T.
    pub target_mean: f32,
    /// Wanted standard deviation, σ_T.
    pub target_std: f32,
    /// `σ_T/σ_D`.
    pub gain: f32,
    /// `μ_T − gain·μ_D`.
    pub bias: f32,
    /// What the reference set was (e.g. `eval chosen + rejected responses`).
    pub reference: String,
    /// How many scores it held.
    pub count: usize,
}

impl RewardNormalization {
    /// Fits the gain and bias to `scores` (population std; at least two distinct scores).
    pub fn fit(scores: &[f32], target_mean: f32, target_std: f32, reference: &str) -> Result<Self, PolicyError> {
        let n = scores.len() as f64;
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / n;
        let var = scores.iter().map(|&s| (s as f64 - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt();
        if scores.len() < 2 || std.is_nan() || std <= 1e-12 || !std.is_finite() {
            return Err(PolicyError::Input(format!(
                "reward normalisation needs scores with a positive spread; {} scores on {reference} have std {std}",
                scores.len()
            )));
        }
        let gain = target_std as f64 / std;
        Ok(RewardNormalization {
            mean: mean as f32,
            std: std as f32,
            target_mean,
            target_std,
            gain: gain as f32,
            bias: (target_mean as f64 - gain * mean) as f32,
            reference: reference.to_string(),
            count: scores.len(),
        })
    }

    /// The same affine map as the env's `(r − mean) / std`.
    pub fn as_score_norm(&self) -> ScoreNorm {
        ScoreNorm { mean: -self.bias / self.gain, std: 1.0 / self.gain }
    }
}

impl<D: FusedOps> LearnedReward<D> {
    /// A fresh score head on `model` (lm-human-preferences' init: 𝒩(0, 1/√(C+1)), no bias).
    pub fn from_backbone(model: CausalLm<D>, pad_id: u32, seed: u64) -> Self {
        let c = model.dims.d_model;
        let head = ScalarHead::new(&model.dev, c, 1.0 / ((c + 1) as f32).sqrt(), seed);
        Self::with_head(model, head, pad_id)
    }

    /// `head` on `model`, whose untied LM head is dropped: a reward or value model reads hidden
    /// states only, and an untied `lm_head` (`V × C`: 205M numbers for OLMo-2-1B) would only
    /// cost memory, a gradient buffer and optimizer moments (transformers'
    /// sequence-classification checkpoints have none).
    pub fn with_head(mut model: CausalLm<D>, head: ScalarHead<D>, pad_id: u32) -> Self {
        model.lm_head = None;
        LearnedReward { model, head, norm: None, pad_id }
    }

    /// Raw scores (no normalisation) read at the last real token of each row of `batch`, with
    /// the tape — the training forward. Correct for left and right padding alike.
    pub fn forward<T: Tape<f32, D>>(&self, batch: &Batch, tape: T) -> Result<Tensor<(usize,), f32, D, T>, PolicyError> {
        let mut rows = Vec::with_capacity(batch.b);
        for (r, j) in batch.last_real_index().into_iter().enumerate() {
            let j = j.ok_or_else(|| PolicyError::Input(format!("row {r} of the batch has no real token")))?;
            rows.push(r * batch.t + j);
        }
        // only the read rows leave the last block (its MLP runs on them alone)
        Ok(self.head.forward(self.model.forward_hidden_rows(batch, &rows, tape)?))
    }

    /// Scores of token sequences (prompt + response each), normalised if `norm` is set.
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<f32>, PolicyError> {
        let raw = self.forward(&Batch::right_padded(seqs, self.pad_id)?, NoneTape)?.as_vec();
        Ok(match self.norm {
            Some(n) => raw.iter().map(|r| (r - n.mean) / n.std).collect(),
            None => raw,
        })
    }

    /// Writes an HF `*ForSequenceClassification` folder: `config.json` (with `num_labels` 1,
    /// `pad_token_id`, and `normalization` under [`NORMALIZATION_KEY`]), `model.safetensors`
    /// (backbone + `score.weight` `(1, C)`), and `tokenizer.json` if given.
    pub fn save_pretrained(
        &self,
        dir: &Path,
        tokenizer: Option<&Tokenizer>,
        normalization: Option<&RewardNormalization>,
    ) -> Result<(), PolicyError> {
        self.save_pretrained_as(dir, tokenizer, normalization, WeightDtype::F32)
    }

    /// [`LearnedReward::save_pretrained`] with the weights in `dtype`
    /// ([`CausalLm::save_pretrained_as`]).
    pub fn save_pretrained_as(
        &self,
        dir: &Path,
        tokenizer: Option<&Tokenizer>,
        normalization: Option<&RewardNormalization>,
        dtype: WeightDtype,
    ) -> Result<(), PolicyError> {
        std::fs::create_dir_all(dir).map_err(|e| PolicyError::io(dir, e))?;
        let mut config = serde_json::to_value(&self.model.config).expect("ModelConfig serialises: plain data");
        let class = match self.model.config {
            ModelConfig::Gpt2(_) => "GPT2ForSequenceClassification",
            ModelConfig::Llama(_) => "LlamaForSequenceClassification",
            ModelConfig::Qwen2(_) => "Qwen2ForSequenceClassification",
            ModelConfig::Qwen3(_) => "Qwen3ForSequenceClassification",
            ModelConfig::Mistral(_) => "MistralForSequenceClassification",
            ModelConfig::Gemma2(_) => "Gemma2ForSequenceClassification",
            ModelConfig::Gemma3Text(_) => "Gemma3TextForSequenceClassification",
            ModelConfig::GptNeox(_) => "GPTNeoXForSequenceClassification",
            ModelConfig::Phi3(_) => "Phi3ForSequenceClassification",
            ModelConfig::Smollm3(_) => "SmolLM3ForSequenceClassification",
            // transformers has none: rlhf's own name, which only rlhf loads (see crate::granite)
            ModelConfig::Granite(_) => "GraniteForSequenceClassification",
            ModelConfig::Olmo2(_) => "Olmo2ForSequenceClassification",
            ModelConfig::Olmo3(_) => "Olmo3ForSequenceClassification",
        };
        config["architectures"] = serde_json::json!([class]);
        config["id2label"] = serde_json::json!({"0": "LABEL_0"});
        config["label2id"] = serde_json::json!({"LABEL_0": 0});
        if config["pad_token_id"].is_null() {
            config["pad_token_id"] = self.pad_id.into();
        }
        if let Some(n) = normalization {
            config[NORMALIZATION_KEY] = serde_json::to_value(n).expect("plain data");
        }
        dtype.mark(&mut config);
        let text = serde_json::to_string_pretty(&config).expect("JSON value serialises");
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let mut tensors = self.model.to_hf_tensors();
        tensors.remove(&self.model.hf_name("lm_head")); // a model built by hand may still hold one
        tensors.extend(self.head_tensors());
        write_safetensors_as(&dir.join("model.safetensors"), &tensors, dtype)?;
        if let Some(tok) = tokenizer {
            tok.save(&dir.join("tokenizer.json"))?;
        }
        Ok(())
    }

    /// Loads what [`LearnedReward::save_pretrained`] wrote, or any HF sequence-classification
    /// folder with one label. The normalisation is returned, not applied (`norm` is `None`).
    /// An untied LM head in the folder (`lm_head.weight`, GPT-NeoX's `embed_out.weight`: older
    /// rlhf checkpoints wrote it) is skipped, as [`LearnedReward::with_head`] drops it.
    pub fn load_pretrained(dir: &Path, dev: &D) -> Result<(Self, Option<RewardNormalization>), PolicyError> {
        let config_path = crate::checkpoint::config_dir(dir)?.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config_path).map_err(|e| PolicyError::io(&config_path, e))?)
                .map_err(|e| PolicyError::config("(file)", e.to_string()).in_file(&config_path))?;
        // a PEFT adapter keeps the reward model's normalisation in a file of its own
        let beside = dir.join(ADAPTER_NORMALIZATION);
        let (source, stored) = match crate::peft::is_adapter(dir) && beside.is_file() {
            true => {
                let text = std::fs::read(&beside).map_err(|e| PolicyError::io(&beside, e))?;
                let v: serde_json::Value = serde_json::from_slice(&text)
                    .map_err(|e| PolicyError::config("(file)", e.to_string()).in_file(&beside))?;
                (beside, Some(v))
            }
            false => (config_path.clone(), raw.get(NORMALIZATION_KEY).cloned()),
        };
        let normalization = match stored {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v).map_err(|e| PolicyError::Config {
                file: source.display().to_string(),
                field: NORMALIZATION_KEY.into(),
                msg: e.to_string(),
            })?),
        };
        let mut model = CausalLm::zeroed(config, dev)?;
        let (file, mut tensors) = crate::checkpoint::read_model(dir)?;
        let head = take_head(&file, &mut tensors, model.dims.d_model, dev)?;
        if !model.dims.tied {
            tensors.remove(&model.hf_name("lm_head"));
            model.lm_head = None;
        }
        model.load_hf_tensors(&file, tensors)?;
        model.origin = Some(dir.to_path_buf());
        let pad_id = model.config.pad_token_id().or(model.config.eos_token_id()).unwrap_or(0);
        Ok((Self::with_head(model, head, pad_id), normalization))
    }
}

/// Removes `score.weight` (`(1, C)`, `(C,)` or `(C, 1)`) and the optional `score.bias` from
/// `tensors` and builds the head.
fn take_head<D: Device<f32>>(
    file: &Path,
    tensors: &mut BTreeMap<String, HostTensor>,
    c: usize,
    dev: &D,
) -> Result<ScalarHead<D>, PolicyError> {
    let w = tensors.remove("score.weight").ok_or_else(|| {
        PolicyError::tensor(file, "score.weight", "missing: this is not a reward model (train one with `rlhf reward`)")
    })?;
    if w.data.len() != c || w.shape.iter().filter(|&&s| s != 1).count() > 1 {
        return Err(PolicyError::tensor(
            file,
            "score.weight",
            format!("shape {:?}; a one-label score head on width {c} needs [1, {c}]", w.shape),
        ));
    }
    let b = match tensors.remove("score.bias") {
        None => 0.0,
        Some(b) if b.data.len() == 1 => b.data[0],
        Some(b) => return Err(PolicyError::tensor(file, "score.bias", format!("shape {:?}, expected [1]", b.shape))),
    };
    Ok(ScalarHead { w: dev.tensor_from_vec(w.data, (c, 1)), b: dev.tensor_from_vec(vec![b], (1,)) })
}

impl<D: Device<f32>> LearnedReward<D> {
    /// The head as HF tensors: `score.weight` `(1, C)`, and `score.bias` when it is not zero.
    fn head_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        out.insert(
            "score.weight".into(),
            HostTensor { shape: vec![1, self.model.dims.d_model], data: self.head.w.as_vec() },
        );
        let bias = self.head.b.as_vec();
        if bias[0] != 0.0 {
            out.insert("score.bias".into(), HostTensor { shape: vec![1], data: bias });
        }
        out
    }
}

/// The trained parameters: the backbone and `score.weight` (the bias stays fixed; see the
/// module doc).
impl<D: Device<f32>> HasParams<D> for LearnedReward<D> {
    fn params(&self) -> Vec<(String, ParamRef<'_, D>)> {
        let mut out = self.model.params();
        out.push(("score.weight".into(), ParamRef::M(&self.head.w)));
        out
    }
    fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, D>)> {
        let mut out = self.model.params_mut();
        out.push(("score.weight".into(), ParamMut::M(&mut self.head.w)));
        out
    }
    fn trunks_mut(&mut self) -> Vec<(&'static str, &mut CausalLm<D>)> {
        vec![("", &mut self.model)]
    }
    fn language_model(&self) -> Option<&CausalLm<D>> {
        Some(&self.model)
    }
    fn adapter_head(&self) -> Option<BTreeMap<String, HostTensor>> {
        Some(self.head_tensors())
    }
}

/// A [`LearnedReward`] that reads the texts in its own tokenizer: each input's prompt and
/// response are encoded with `tok`, and the response closed by the reward model's `eos` when
/// it ended on one of `end_ids` (the policy's EOS and stop ids) — the layout reward training
/// gives its sequences. For a reward model whose vocabulary is not the policy's.
#[derive(Debug)]
pub struct Retokenized<D: FusedOps = Cpu> {
    /// The reward model.
    pub rm: LearnedReward<D>,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// Its EOS (`None`: responses are never closed).
    pub eos: Option<u32>,
    /// The ids that end the policy's responses.
    pub end_ids: Vec<u32>,
}

impl<D: FusedOps> Retokenized<D> {
    /// `rm` reading texts with `tok` (its EOS from `tok` and the model's config).
    pub fn new(rm: LearnedReward<D>, tok: Tokenizer, end_ids: Vec<u32>) -> Self {
        let eos = tok.eos_for(&rm.model.config);
        Retokenized { rm, tok, eos, end_ids }
    }

    fn encode(&self, x: &RewardInput) -> Result<RewardInput, PolicyError> {
        let finished = x.response_ids.last().is_some_and(|t| self.end_ids.contains(t));
        let mut response_ids = self.tok.encode(&x.response)?;
        response_ids.extend(self.eos.filter(|_| finished));
        Ok(RewardInput { prompt_ids: self.tok.encode_prompt(&x.prompt)?, response_ids, ..x.clone() })
    }
}

impl<D: FusedOps> RewardModel for Retokenized<D> {
    fn name(&self) -> String {
        "learned (own tokenizer)".into()
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        let err = |e: PolicyError| EnvError::reward("learned", e.to_string());
        let inputs: Vec<RewardInput> = batch.iter().map(|x| self.encode(x)).collect::<Result<_, _>>().map_err(err)?;
        self.rm.score(&inputs)
    }
}

impl<D: FusedOps> RewardModel for LearnedReward<D> {
    fn name(&self) -> String {
        "learned".into()
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>, EnvError> {
        let seqs: Vec<Vec<u32>> = batch.iter().map(|x| [x.prompt_ids.as_slice(), &x.response_ids].concat()).collect();
        self.score_ids(&seqs).map_err(|e| EnvError::reward("learned", e.to_string()))
    }
}
