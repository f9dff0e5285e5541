//! Checkpoints and tokenizers: save → load gives bit-identical logits, an HF fixture re-saved
//! gives back the same state dict, and tokenizer.json files round-trip.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf_policies::checkpoint::{load_with_tokenizer, read_safetensors};
use rlhf_policies::{Batch, CausalLm, ModelConfig, Tokenizer};

fn roundtrip(cfg: ModelConfig) {
    let dev = Cpu::default();
    let m = CausalLm::new(cfg, &dev, 17).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path(), None).unwrap();
    let back = CausalLm::load_pretrained(dir.path(), &dev).unwrap();
    assert_eq!(back.config, m.config);
    let batch = Batch::left_padded(&[vec![1, 2, 3, 4], vec![5, 6]], 0).unwrap();
    let a = m.forward(&batch, NoneTape).unwrap().as_vec();
    let b = back.forward(&batch, NoneTape).unwrap().as_vec();
    assert_eq!(a, b, "logits are not bit-identical after save/load");
}

#[test]
fn save_load_is_bit_identical_gpt2() {
    roundtrip(ModelConfig::gpt2_preset(64, 32, 2, 4, 16));
}

#[test]
fn save_load_is_bit_identical_llama_tied_and_untied() {
    for tied in [false, true] {
        let json = format!(
            r#"{{"model_type":"llama","vocab_size":64,"hidden_size":32,"intermediate_size":40,"num_hidden_layers":2,
                "num_attention_heads":4,"num_key_value_heads":1,"tie_word_embeddings":{tied}}}"#
        );
        roundtrip(ModelConfig::from_json_str(&json).unwrap());
    }
}

/// Loading an HF checkpoint and saving it again reproduces its state dict exactly (names,
/// shapes, values): our files are what transformers wrote, so transformers reads them back.
#[test]
fn hf_fixtures_resave_to_the_same_state_dict() {
    for name in HF_FIXTURES {
        let dir = fixture(name);
        let m = CausalLm::load_pretrained(&dir, &Cpu::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        m.save_pretrained(out.path(), None).unwrap();
        let orig = read_safetensors(&dir.join("model.safetensors")).unwrap();
        let ours = read_safetensors(&out.path().join("model.safetensors")).unwrap();
        assert_eq!(orig, ours, "{name}: state dict differs");
        // the config keeps the HF field names and values
        let cfg_orig = read_json(&dir.join("config.json"));
        let cfg_ours = read_json(&out.path().join("config.json"));
        let gemma: &[&str] = match name {
            "hf-gemma3-tiny" => &["layer_types", "query_pre_attn_scalar"],
            "hf-gemma2-tiny" => &["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"],
            "hf-granite-tiny" => {
                &["embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"]
            }
            _ => &[],
        };
        let keys = [
            "model_type",
            "vocab_size",
            "tie_word_embeddings",
            "architectures",
            "eos_token_id",
            "rope_parameters",
            "sliding_window",
        ];
        for &key in keys.iter().chain(gemma) {
            assert_eq!(cfg_orig[key], cfg_ours[key], "{name}: {key}");
        }
    }
}

/// A Pythia checkpoint as transformers 4.2x saved it: per layer the causal mask `attention.bias`
/// (bool; uint8 in older files), `attention.masked_bias` and `rotary_emb.inv_freq` beside the
/// weights, which load and give transformers' logits; the head under transformers 5's in-memory
/// name `lm_head.weight` reads as `embed_out.weight`. A bool tensor that is not a mask buffer
/// is an error naming it.
#[test]
fn pythia_legacy_buffers_and_the_lm_head_name_load() {
    use ::safetensors::{tensor::TensorView, Dtype};
    let src = fixture("hf-pythia-tiny");
    let exp = read_json(&src.join("expected.json"));
    let ids = u32s(&exp["texts"][0]["ids"]);
    let want = f32s_2d(&exp["texts"][0]["logits"]).concat();
    let weights = read_safetensors(&src.join("model.safetensors")).unwrap();
    let f32_bytes = |t: &rlhf_policies::checkpoint::HostTensor| -> Vec<u8> {
        t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    let write = |extra: &[(&str, Dtype, Vec<usize>, Vec<u8>)], head: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = weights
            .iter()
            .map(|(n, t)| {
                let name = if n == "embed_out.weight" { head.to_string() } else { n.clone() };
                (name, Dtype::F32, t.shape.clone(), f32_bytes(t))
            })
            .collect();
        owned.extend(extra.iter().map(|(n, d, s, b)| (n.to_string(), *d, s.clone(), b.clone())));
        let views: Vec<(String, TensorView<'_>)> =
            owned.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        ::safetensors::serialize_to_file(views, &None, &dir.path().join("model.safetensors")).unwrap();
        dir
    };
    let p = 128;
    let mask: Vec<u8> = (0..p * p).map(|k| ((k % p) <= (k / p)) as u8).collect();
    let mut legacy = vec![];
    for i in 0..2 {
        let l = format!("gpt_neox.layers.{i}.attention");
        legacy.push((
            format!("{l}.bias"),
            if i == 0 { Dtype::BOOL } else { Dtype::U8 },
            vec![1, 1, p, p],
            mask.clone(),
        ));
        legacy.push((format!("{l}.masked_bias"), Dtype::F32, vec![], (-1e9f32).to_le_bytes().to_vec()));
        let inv: Vec<u8> = [1.0f32, 0.01].iter().flat_map(|v| v.to_le_bytes()).collect();
        legacy.push((format!("{l}.rotary_emb.inv_freq"), Dtype::F32, vec![2], inv));
    }
    let legacy: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> =
        legacy.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone())).collect();
    for (extra, head) in [(&legacy[..], "embed_out.weight"), (&[][..], "lm_head.weight")] {
        let dir = write(extra, head);
        let m = CausalLm::load_pretrained(dir.path(), &Cpu::default()).unwrap();
        let got = m.forward(&Batch::unpadded(std::slice::from_ref(&ids)).unwrap(), NoneTape).unwrap().as_vec();
        assert!(max_abs_diff(&got, &want) < 1e-4, "{head}: logits differ by {}", max_abs_diff(&got, &want));
    }
    let stray = [("gpt_neox.layers.0.attention.flags", Dtype::BOOL, vec![2], vec![1u8, 0])];
    let dir = write(&stray, "embed_out.weight");
    let err = CausalLm::load_pretrained(dir.path(), &Cpu::default()).unwrap_err().to_string();
    assert!(err.contains("gpt_neox.layers.0.attention.flags") && err.contains("BOOL"), "{err}");
}

/// A reward model on the untied GPT-NeoX saves as `GPTNeoXForSequenceClassification` and loads
/// back with the same scores; its checkpoint leaves the untied `embed_out.weight` out (a reward
/// model never reads it) and one in the file, as older rlhf checkpoints had, is skipped.
#[test]
fn gpt_neox_reward_model_round_trips() {
    use rlhf_policies::{HasParams, LearnedReward, ScalarHead};
    let dev = Cpu::default();
    let model = CausalLm::load_pretrained(&fixture("hf-pythia-tiny"), &dev).unwrap();
    let rm = LearnedReward { model, head: ScalarHead::new(&dev, 64, 0.5, 4), norm: None, pad_id: 0 };
    let seqs = vec![vec![5, 9, 2, 7], vec![11, 3]];
    let want = rm.score_ids(&seqs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    rm.save_pretrained(dir.path(), None, None).unwrap();
    assert_eq!(read_json(&dir.path().join("config.json"))["architectures"][0], "GPTNeoXForSequenceClassification");
    let weights = dir.path().join("model.safetensors");
    assert!(!read_safetensors(&weights).unwrap().contains_key("embed_out.weight"), "the LM head is left out");
    let (v, c) = (rm.model.dims.vocab, rm.model.dims.d_model);
    for old_layout in [false, true] {
        if old_layout {
            // what older rlhf checkpoints carried: skipped on load
            let mut t = read_safetensors(&weights).unwrap();
            let head = rlhf_policies::checkpoint::HostTensor { shape: vec![v, c], data: vec![0.5; v * c] };
            t.insert("embed_out.weight".into(), head);
            rlhf_policies::checkpoint::write_safetensors(&weights, &t).unwrap();
        }
        let (back, _) = LearnedReward::load_pretrained(dir.path(), &dev).unwrap();
        assert_eq!(back.score_ids(&seqs).unwrap(), want, "with embed_out in the file: {old_layout}");
        assert!(back.model.lm_head.is_none() && !back.params().iter().any(|(n, _)| n == "lm_head"));
    }
}

/// Llama 3's and Qwen2's pre-tokenizers (regular expressions with look-ahead and `(?i:…)`),
/// on small BPEs made by `scripts/fixtures/pre_tokenizers_fixture.py`: the ids Hugging Face's
/// Python `tokenizers` gives, and the text back; a prompt gets Llama 3's BOS as `tokenizer(text)`
/// gives it (Qwen2 adds none), once even when the text starts with it (a chat template's).
#[test]
fn llama3_and_qwen2_pre_tokenizers_encode_as_the_python_library_does() {
    let dir = fixture("tokenizers");
    let expected = read_json(&dir.join("expected.json"));
    for (name, bos) in [("llama3", Some(0)), ("qwen2", None)] {
        let tok = Tokenizer::from_file(&dir.join(format!("{name}.json"))).unwrap();
        assert_eq!(tok.bos_prefix(), bos, "{name}");
        for case in expected[name].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids, u32s(&case["ids"]), "{name}: {text:?}");
            assert_eq!(tok.decode(&ids).unwrap(), text, "{name}");
            assert_eq!(tok.encode_prompt(text).unwrap(), u32s(&case["ids_with_special"]), "{name}: {text:?}");
        }
        let templated = tok.encode_prompt("<|begin_of_text|>Hello").unwrap();
        assert_eq!(templated.iter().filter(|&&t| t == 0).count(), 1, "{name}: {templated:?}");
    }
}

#[test]
fn fixture_tokenizer_encodes_like_hf_and_round_trips() {
    let dir = fixture("hf-gpt2-tiny");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.eos_id(), Some(0));
    let exp = read_json(&dir.join("expected.json"));
    let tmp = tempfile::tempdir().unwrap();
    tok.save(&tmp.path().join("tokenizer.json")).unwrap();
    let again = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    for text in exp["texts"].as_array().unwrap() {
        let s = text["text"].as_str().unwrap();
        let ids = tok.encode(s).unwrap();
        assert_eq!(ids, u32s(&text["ids"]));
        assert_eq!(again.encode(s).unwrap(), ids);
        assert_eq!(tok.decode(&ids).unwrap(), s);
    }
}

#[test]
fn checkpoint_folder_with_tokenizer_loads_both() {
    let (m, tok) = load_with_tokenizer(&fixture("hf-llama-tiny"), &Cpu::default()).unwrap();
    assert_eq!(m.dims.vocab, tok.vocab_size());
}

fn shakespeare_lines(n_bytes: usize) -> Vec<String> {
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    text[..n_bytes].lines().map(|l| format!("{l}\n")).collect()
}

#[test]
fn trained_bpe_has_reserved_ids_and_round_trips() {
    let lines = shakespeare_lines(50_000);
    let tok = Tokenizer::train_bpe(lines.iter(), 400, 2).unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|pad|>"), Some(1));
    assert_eq!(tok.vocab_size(), 400);
    let text = "To be, or not to be: that is the question.\nÜnïcödé ✓";
    let ids = tok.encode(text).unwrap();
    assert!(ids.len() < text.len(), "merges compress the text");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // special tokens in text are single ids
    assert_eq!(tok.encode("a<|endoftext|>").unwrap().last(), Some(&0));
    let tmp = tempfile::tempdir().unwrap();
    tok.save(&tmp.path().join("tokenizer.json")).unwrap();
    let back = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    assert_eq!(back.encode(text).unwrap(), ids);
}

#[test]
fn char_level_tokenizer_round_trips_and_rejects_unknown_chars() {
    let text = "hello world\nthe end.";
    let tok = Tokenizer::char_level(text).unwrap();
    let distinct = text.chars().collect::<std::collections::BTreeSet<_>>().len();
    assert_eq!(tok.vocab_size(), distinct + 1);
    let ids = tok.encode("the world").unwrap();
    assert_eq!(ids.len(), 9);
    assert_eq!(tok.decode(&ids).unwrap(), "the world");
    let err = tok.encode("xyz").unwrap_err().to_string();
    assert!(err.contains("'x'"), "{err}");
    // the saved tokenizer.json loads back as character level (HF's BPE with no merges)
    let tmp = tempfile::tempdir().unwrap();
    tok.save(&tmp.path().join("tokenizer.json")).unwrap();
    let back = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    assert_eq!(back.encode("the world").unwrap(), ids);
    assert!(back.encode("xyz").is_err());
}

/// Chat templates in the styles of popular models (block tags on their own lines, Python
/// string methods, loop controls, Llama 3's, Qwen2.5's and Qwen3's shapes) render as transformers'
/// `apply_chat_template` renders them (`scripts/fixtures/chat_templates.py`), also with a template
/// variable passed through (Qwen3's `enable_thinking`).
#[test]
fn chat_templates_render_as_transformers_renders_them() {
    use rlhf_policies::chat::{ChatMessage, ChatTemplate};
    let fixture = read_json(&fixture("chat_templates.json"));
    let token = |k: &str| fixture[k].as_str().unwrap().to_string();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kwargs = case.get("kwargs").and_then(|k| k.as_object()).cloned().unwrap_or_default();
        let template = ChatTemplate::new(case["template"].as_str().unwrap(), &token("bos_token"), &token("eos_token"))
            .and_then(|t| t.with_kwargs(kwargs))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = template.render(&messages, gen).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, case["expected"].as_str().unwrap(), "{name}, add_generation_prompt {gen}");
    }
}

/// `tokenizer_config.json`'s `chat_template` as a string, or as transformers' list of named
/// templates (the one named `default` is used); a list without one, or another type, is an
/// error naming the file and the field; a processor's `chat_template.json` where
/// `tokenizer_config.json` has none.
#[test]
fn a_list_of_named_chat_templates_gives_the_default_one() {
    use rlhf_policies::chat::ChatTemplate;
    let d = tempfile::tempdir().unwrap();
    let with = |template: serde_json::Value| {
        let cfg = serde_json::json!({"chat_template": template, "eos_token": "</s>"});
        std::fs::write(d.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        ChatTemplate::source_of(d.path())
    };
    assert_eq!(with("{{ x }}".into()).unwrap().as_deref(), Some("{{ x }}"));
    let named = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
    assert_eq!(with(named).unwrap().as_deref(), Some("D"));
    assert_eq!(with(serde_json::Value::Null).unwrap(), None);
    let e = with(serde_json::json!([{"name": "tool_use", "template": "T"}])).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("chat_template") && e.contains("tool_use"), "{e}");
    let e = with(7.into()).unwrap_err().to_string();
    assert!(e.contains("must be a string or a list"), "{e}");
    // a processor's chat_template.json (multimodal checkpoints) when tokenizer_config.json has
    // none; chat_template.jinja first of all
    std::fs::write(d.path().join("chat_template.json"), r#"{"chat_template": "P"}"#).unwrap();
    assert_eq!(with("{{ x }}".into()).unwrap().as_deref(), Some("{{ x }}"));
    assert_eq!(with(serde_json::Value::Null).unwrap().as_deref(), Some("P"));
    std::fs::write(d.path().join("chat_template.jinja"), "J").unwrap();
    assert_eq!(with(serde_json::Value::Null).unwrap().as_deref(), Some("J"));
    std::fs::remove_file(d.path().join("chat_template.jinja")).unwrap();
    std::fs::write(d.path().join("chat_template.json"), "{").unwrap();
    let e = with(serde_json::Value::Null).unwrap_err().to_string();
    assert!(e.contains("chat_template.json"), "{e}");
}

/// A sharded checkpoint (transformers' layout for large models: `model.safetensors.index.json`
/// mapping each tensor to its shard) loads as the single file does; a tensor the index names
/// but its shard lacks is an error naming both.
#[test]
fn a_sharded_checkpoint_loads_as_the_single_file() {
    use rlhf_policies::checkpoint::{write_safetensors, SHARD_INDEX};
    let src = fixture("hf-qwen2-tiny");
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let all = read_safetensors(&src.join("model.safetensors")).unwrap();
    let names: Vec<&String> = all.keys().collect();
    let mut weight_map = serde_json::Map::new();
    for (k, half) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let part: std::collections::BTreeMap<String, _> = half.iter().map(|&n| (n.clone(), all[n].clone())).collect();
        write_safetensors(&d.path().join(&file), &part).unwrap();
        for n in half {
            weight_map.insert(n.to_string(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(d.path().join(SHARD_INDEX), index.to_string()).unwrap();
    let sharded = CausalLm::load_pretrained(d.path(), &Cpu::default()).unwrap();
    let single = CausalLm::load_pretrained(&src, &Cpu::default()).unwrap();
    assert_eq!(sharded.to_hf_tensors(), single.to_hf_tensors());
    let mut index = index;
    index["weight_map"]["model.norm.bias"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(d.path().join(SHARD_INDEX), index.to_string()).unwrap();
    let e = CausalLm::load_pretrained(d.path(), &Cpu::default()).unwrap_err().to_string();
    assert!(
        e.contains("model.norm.bias") && e.contains("model-00001-of-00002") && e.contains("not in the shard"),
        "{e}"
    );
}

/// `generation_config.json`'s `eos_token_id` joins the config's EOS among the ids that end a
/// generation (as in transformers' `generate`): greedy decoding of the Llama fixture stops at the
/// third new token once that token is listed there, and not before; the file travels unchanged
/// with a saved checkpoint; a malformed one, or an id past the vocabulary, is an error naming it.
#[test]
fn generation_config_eos_ids_end_generations_and_travel_with_checkpoints() {
    use rlhf_policies::{generate, InferenceModel, SamplingConfig};
    let src = fixture("hf-llama-tiny");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let greedy = &read_json(&src.join("expected.json"))["greedy"][0];
    let (prompt, new) = (u32s(&greedy["prompt_ids"]), u32s(&greedy["new_ids"]));
    let stop = new[2];
    assert!(!new[..2].contains(&stop) && stop != 0, "the fixture's third greedy token first appears there");
    let text = format!("{{\n  \"eos_token_id\": [0, {stop}],\n  \"temperature\": 0.7\n}}\n");
    std::fs::write(dir.path().join("generation_config.json"), &text).unwrap();
    let (model, tok) = load_with_tokenizer(dir.path(), &Cpu::default()).unwrap();
    assert_eq!((model.config.eos_token_ids(), tok.eos_ids_for(&model.config)), (vec![0], vec![0, stop]));
    let run = |eos_ids: Vec<u32>| {
        let cfg = SamplingConfig { greedy: true, max_new_tokens: 20, eos_ids, ..Default::default() };
        generate(&InferenceModel::from_model(&model), std::slice::from_ref(&prompt), 0, &cfg).unwrap().tokens[0].clone()
    };
    assert_eq!(run(model.config.eos_token_ids()), new, "the config's EOS alone: all 20 tokens");
    assert_eq!(run(tok.eos_ids_for(&model.config)), new[..3], "stopped at the listed id");
    // saved with the checkpoint, byte for byte, and read back
    let saved = tempfile::tempdir().unwrap();
    model.save_pretrained(saved.path(), Some(&tok)).unwrap();
    assert_eq!(std::fs::read_to_string(saved.path().join("generation_config.json")).unwrap(), text);
    let (_, again) = load_with_tokenizer(saved.path(), &Cpu::default()).unwrap();
    assert_eq!(again.generation, tok.generation);
    for (bad, field) in
        [("{\"eos_token_id\": \"</s>\"}", "eos_token_id"), ("{oops", "json"), ("{\"eos_token_id\": 512}", "512")]
    {
        std::fs::write(dir.path().join("generation_config.json"), bad).unwrap();
        let e = load_with_tokenizer(dir.path(), &Cpu::default()).unwrap_err().to_string();
        assert!(e.contains("generation_config.json") && e.contains(field), "{bad}: {e}");
    }
}
