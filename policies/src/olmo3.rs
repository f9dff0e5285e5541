//! OLMo 3 (`Olmo3ForCausalLM`, `model_type: "olmo3"`: AllenAI's Olmo-3-7B and -32B and their
//! Think/Instruct checkpoints): OLMo 2's block ([`crate::olmo2`]) with local layers — by default
//! three of every four attend to their last `sliding_window` positions (`layer_types`) — whose
//! RoPE is the plain one, while the global layers take the config's scaling (YaRN in the
//! released long-context configs, [`crate::yarn`]): [`Dims::rope_local_theta`] is the same base
//! without the scaling.
//!
//! Both config layouts load: transformers 4's `rope_theta` and `rope_scaling` (the scaling is
//! the global layers'), and transformers 5's `rope_parameters` with one entry per layer type.
//! The config is kept as read and saved back so; the sizes go through OLMo 2's ([`LlamaConfig`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{Dims, LlamaConfig};
use crate::error::PolicyError;

/// `Olmo3Config`: OLMo 2's fields ([`LlamaConfig`]'s names) with the layer types, and RoPE
/// either flat (transformers 4) or per layer type (transformers 5). The JSON object is kept as
/// read and saved back so; its OLMo 2 reading is made once, when it is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Map<String, Value>", into = "Map<String, Value>")]
pub struct Olmo3Config {
    raw: Map<String, Value>,
    olmo2: LlamaConfig,
}

impl TryFrom<Map<String, Value>> for Olmo3Config {
    type Error = PolicyError;
    fn try_from(raw: Map<String, Value>) -> Result<Self, PolicyError> {
        let olmo2 = olmo2_of(&raw)?;
        Ok(Olmo3Config { raw, olmo2 })
    }
}

impl From<Olmo3Config> for Map<String, Value> {
    fn from(c: Olmo3Config) -> Self {
        c.raw
    }
}

/// Writes transformers' `Olmo3Config` defaults that differ from Llama's into an `olmo3` config
/// object where it leaves them out.
pub(crate) fn fill_defaults(config: &mut Value) {
    let defaults: [(&str, Value); 4] = [
        ("pad_token_id", 1.into()),
        ("eos_token_id", 50279.into()),
        ("rms_norm_eps", 1e-5.into()),
        ("sliding_window", 4096.into()),
    ];
    crate::config::fill_defaults(config, defaults, "Olmo3ForCausalLM");
}

/// The config object read as OLMo 2's, with the global layers' RoPE.
fn olmo2_of(raw: &Map<String, Value>) -> Result<LlamaConfig, PolicyError> {
    let mut c = raw.clone();
    for key in ["layer_types", "sliding_window"] {
        c.remove(key);
    }
    if let Some(Value::Object(params)) = c.get("rope_parameters").cloned() {
        if params.contains_key("full_attention") || params.contains_key("sliding_attention") {
            let (global, local) = (params.get("full_attention"), params.get("sliding_attention"));
            let theta = |p: Option<&Value>| p.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
            let kind = local.and_then(|p| p.get("rope_type")).and_then(Value::as_str).unwrap_or("default");
            if kind != "default" || theta(local) != theta(global) {
                let local = local.map(Value::to_string).unwrap_or_else(|| "none".into());
                let msg = format!("{local}: the local layers take the global base without scaling");
                return Err(PolicyError::config("rope_parameters.sliding_attention", msg));
            }
            match global {
                Some(g) => c.insert("rope_parameters".into(), g.clone()),
                None => c.remove("rope_parameters"),
            };
        }
    }
    serde_json::from_value(Value::Object(c))
        .map_err(|e| PolicyError::config(crate::config::field_of_serde_error(&e), e.to_string()))
}

impl Olmo3Config {
    /// The config as OLMo 2's, with the global layers' RoPE: what the sizes and the special ids
    /// are read from.
    pub fn olmo2(&self) -> &LlamaConfig {
        &self.olmo2
    }

    /// The config object as read.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }

    /// Sets one field of the config object, which must still read.
    pub fn set(&mut self, key: &str, value: Value) -> Result<(), PolicyError> {
        let mut raw = self.raw.clone();
        raw.insert(key.into(), value);
        *self = Self::try_from(raw)?;
        Ok(())
    }

    /// Each layer's attention window: `Some(sliding_window)` for a local layer, `None` for a
    /// global one (every fourth by default).
    pub fn layer_windows(&self) -> Result<Vec<Option<usize>>, PolicyError> {
        let n = self.olmo2.num_hidden_layers;
        let types: Option<Vec<String>> = match self.raw.get("layer_types") {
            None | Some(Value::Null) => None,
            Some(v) => {
                Some(serde_json::from_value(v.clone()).map_err(|e| PolicyError::config("layer_types", e.to_string()))?)
            }
        };
        let window = match self.raw.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(v) => {
                Some(v.as_u64().ok_or_else(|| PolicyError::config("sliding_window", format!("{v} is not a count")))?
                    as usize)
            }
        };
        let periodic = || Ok(crate::gemma3::periodic_sliding(n, 4));
        crate::gemma3::windows_of(types.as_deref(), n, periodic, window)
    }

    /// The resolved sizes; the error names the offending field.
    pub(crate) fn dims(&self) -> Result<Dims, PolicyError> {
        let d = crate::olmo2::dims(&self.olmo2)?;
        let windows = self.layer_windows()?;
        Ok(Dims { sliding_window: windows.iter().flatten().next().copied(), rope_local_theta: Some(d.rope_theta), ..d })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;
    use crate::rope::RopeScaling;

    /// Olmo-3-7B-Instruct's `config.json` as transformers 4.57 wrote it (`layer_types` left out
    /// here: the default pattern gives the same).
    const OLMO3_7B: &str = r#"{"architectures": ["Olmo3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 65536,
        "model_type": "olmo3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": {"attention_factor": 1.2079441541679836,
        "beta_fast": 32, "beta_slow": 1, "factor": 8.0, "original_max_position_embeddings": 8192,
        "rope_type": "yarn"}, "rope_theta": 500000, "sliding_window": 4096, "tie_word_embeddings": false,
        "transformers_version": "4.57.0", "use_cache": true, "vocab_size": 100278}"#;

    #[test]
    fn reads_olmo3_7b_config_in_both_layouts() {
        let cfg = ModelConfig::from_json_str(OLMO3_7B).unwrap();
        let d = cfg.dims().unwrap();
        assert!(!d.pre_norms && d.post_norms && d.qk_norm_full && !d.tied);
        assert_eq!((d.sliding_window, d.rope_theta, d.rope_local_theta), (Some(4096), 5e5, Some(5e5)));
        assert!(matches!(d.rope_scaling, Some(RopeScaling::Yarn(y)) if y.factor == 8.0));
        assert_eq!(d.local_rope().rope_scaling, None);
        let windows = cfg.layer_windows().unwrap();
        assert!(windows.iter().enumerate().all(|(i, w)| w.is_none() == ((i + 1) % 4 == 0)));
        assert_eq!((cfg.eos_token_ids(), cfg.pad_token_id()), (vec![100257], Some(100277)));
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json_pretty()).unwrap(), cfg);
        // transformers 5's layout: one RoPE entry per layer type
        let tf5 = OLMO3_7B.replace(
            r#""rope_scaling": {"attention_factor""#,
            r#""rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 500000},
                "full_attention": {"rope_theta": 500000, "attention_factor""#,
        );
        let tf5 = tf5.replace(r#""rope_type": "yarn"}, "rope_theta": 500000,"#, r#""rope_type": "yarn"}},"#);
        let d5 = ModelConfig::from_json_str(&tf5).unwrap().dims().unwrap();
        assert_eq!(d5, d);
        let bad = tf5.replacen(
            r#""rope_type": "default", "rope_theta": 500000"#,
            r#""rope_type": "default", "rope_theta": 10000"#,
            1,
        );
        let e = ModelConfig::from_json_str(&bad).unwrap_err().to_string();
        assert!(e.contains("rope_parameters.sliding_attention") && e.contains("10000"), "{e}");
        let e = ModelConfig::from_json_str(&OLMO3_7B.replace(r#""hidden_size": 4096,"#, "")).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }
}
