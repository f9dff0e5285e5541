//! SmolLM2-135M-Instruct from its Q4_1 GGUF against `shared/fixtures/smollm2` (transformers'
//! GGUF loader): dequantisation spot checks exact, last-position logits by id within 1e-3,
//! the 24-token greedy continuation identical; every other supported tensor type against
//! llama.cpp's Python package; and malformed files as errors.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf_policies::gguf::Gguf;
use rlhf_policies::{generate, Batch, CausalLm, InferenceModel, SamplingConfig};
use serde_json::Value;

fn gguf_path() -> std::path::PathBuf {
    shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn expected() -> Value {
    read_json(&fixture("smollm2/expected.json"))
}

#[test]
fn dequantised_tensors_match_the_gguf_package() {
    let g = Gguf::open(&gguf_path()).unwrap();
    for c in expected()["gguf_dequant_checks"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let t = g.tensor(name).unwrap();
        let shape: Vec<usize> = u32s(&c["row_major_shape"]).iter().map(|&d| d as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.data[..40], f32s(&c["first_40"])[..], "{name}: first 40");
        assert_eq!(t.data[t.data.len() - 8..], f32s(&c["last_8"])[..], "{name}: last 8");
        let sum: f64 = t.data.iter().map(|&x| x as f64).sum();
        let abs: f64 = t.data.iter().map(|&x| (x as f64).abs()).sum();
        for (got, key) in [(sum, "sum_f64"), (abs, "sum_abs_f64")] {
            let want = c[key].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{name} {key}: {got} vs {want}");
        }
    }
}

#[test]
fn smollm2_logits_and_greedy_continuation_match_transformers() {
    let dev = Cpu::default();
    let model = CausalLm::load_gguf(&gguf_path(), &dev).unwrap();
    assert_eq!((model.dims.n_layer, model.dims.n_head, model.dims.n_kv_head, model.dims.vocab), (30, 9, 3, 49152));
    let e = expected();
    let v = model.dims.vocab;
    let mut worst = 0.0f32;
    for s in e["strings"].as_array().unwrap() {
        let ids = u32s(&s["ids"]);
        let logits = model.forward(&Batch::unpadded(std::slice::from_ref(&ids)).unwrap(), NoneTape).unwrap().as_vec();
        let last = &logits[(ids.len() - 1) * v..ids.len() * v];
        for (ids_key, logits_key) in [("top10_ids", "top10_logits"), ("probe_ids", "probe_logits")] {
            for (&id, &want) in u32s(&s[ids_key]).iter().zip(&f32s(&s[logits_key])) {
                let got = last[id as usize];
                worst = worst.max((got - want).abs());
                assert!((got - want).abs() < 1e-3, "{:?} id {id}: {got} vs {want}", s["text"]);
            }
        }
        let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + last.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
        assert!((lse - s["last_logsumexp"].as_f64().unwrap() as f32).abs() < 1e-3, "logsumexp {lse}");
    }
    eprintln!("largest logit difference from transformers: {worst}");
    let greedy = &e["greedy"];
    let cfg = SamplingConfig { greedy: true, max_new_tokens: 24, ..Default::default() };
    let out = generate(&InferenceModel::from_model(&model), &[u32s(&greedy["prompt_ids"])], 2, &cfg).unwrap();
    assert_eq!(out.tokens[0], u32s(&greedy["new_ids"]));
}

/// A minimal GGUF v3: one metadata string, one tensor of `ty` with `n` values at `offset`.
fn tiny_gguf(ty: u32, n: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "w");
    b.extend(1u32.to_le_bytes());
    b.extend(n.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(offset.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend(data);
    b
}

/// BF16, Q5_0, Q5_1 and the K-quants (what `Q4_K_M`-style files hold) read from a file equal
/// llama.cpp's own Python dequantisation of the same random blocks (made by
/// `scripts/fixtures/gguf_quants.py`), to the bit.
#[test]
fn every_quantisation_type_dequantises_as_llama_cpp_s_package_does() {
    let fixture = read_json(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quants.json"));
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let hex = case["bytes_hex"].as_str().unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let n = case["values"].as_u64().unwrap();
        let g = Gguf::parse(tiny_gguf(case["type_id"].as_u64().unwrap() as u32, n, 0, &bytes), "q.gguf".as_ref());
        let got = g.and_then(|g| g.tensor("w")).unwrap_or_else(|e| panic!("{name}: {e}")).data;
        let want = f32s(&case["expected"]);
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{name} value {i}: {g} vs {w}");
        }
    }
}

#[test]
fn malformed_files_are_errors_naming_the_problem() {
    let p = std::path::Path::new("bad.gguf");
    let parse = |b: Vec<u8>| Gguf::parse(b, p).map(|g| g.tensor("w")).and_then(|r| r).map(|t| t.data);
    let floats: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(parse(tiny_gguf(0, 2, 0, &floats)).unwrap(), vec![1.5, -2.0], "the well-formed file reads");
    let e = parse(b"GGML and more bytes".to_vec()).unwrap_err().to_string();
    assert!(e.contains("bad.gguf") && e.contains("magic"), "{e}");
    let good = tiny_gguf(0, 2, 0, &floats);
    for cut in [6, 20, 40, 60] {
        let e = parse(good[..cut].to_vec()).unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("past the end"), "cut at {cut}: {e}");
    }
    let e = parse(tiny_gguf(16, 256, 0, &[0; 66])).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("IQ2_XXS") && e.contains("not supported") && e.contains("IQ4_XS"), "{e}");
    let e = parse(tiny_gguf(0, 2, 1 << 40, &floats)).unwrap_err().to_string();
    assert!(e.contains("past the end"), "{e}");
    // a count that cannot fit in the file is refused before anything is allocated
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse(huge).unwrap_err().to_string().contains("cannot fit"));
}

#[test]
fn the_tokenizer_built_from_the_gguf_metadata_matches_transformers() {
    let g = Gguf::open(&gguf_path()).unwrap();
    let tok = rlhf_policies::Tokenizer::from_json(&rlhf_policies::gguf::tokenizer_json(&g).unwrap(), "gguf").unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    for s in expected()["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), u32s(&s["ids"]), "{text:?}");
        assert_eq!(tok.decode(&u32s(&s["ids"])).unwrap(), text);
    }
    assert_eq!((tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")), (Some(1), Some(2)));
}

#[test]
fn the_chat_template_renders_as_transformers_does() {
    use rlhf_policies::chat::{ChatMessage, ChatTemplate};
    let e = expected();
    let messages: Vec<ChatMessage> = e["tokenizer"]["chat_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let want = e["strings"][2]["text"].as_str().unwrap();
    // the template stored in the GGUF file, and the fixture's copy of it
    let (model, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&gguf_path(), &Cpu::default()).unwrap();
    let from_gguf = ChatTemplate::new(tok.chat_template.clone().unwrap(), "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(from_gguf.render(&messages, true).unwrap(), want);
    // the template travels with checkpoints written from the model
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path(), Some(&tok)).unwrap();
    let (_, again) = rlhf_policies::checkpoint::load_with_tokenizer(dir.path(), &Cpu::default()).unwrap();
    assert_eq!(again.chat_template, tok.chat_template);
    let source = std::fs::read_to_string(fixture("smollm2/chat_template.jinja")).unwrap();
    let t = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(t.render(&messages, true).unwrap(), want);
    // with a system message the default one is not added
    let sys = [ChatMessage { role: "system".into(), content: "Be brief.".into() }, messages[0].clone()];
    assert!(t.render(&sys, false).unwrap().starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"));
}

/// f16 weights for the rollout engine halve the bytes each decoded token reads; their
/// logits stay within 0.05 of the f32 engine's on SmolLM2 (30 layers).
#[test]
fn f16_rollout_weights_stay_close_to_f32() {
    use rlhf_policies::{KvCache, LogitsAt, WeightDtype};
    let model = CausalLm::load_gguf(&gguf_path(), &Cpu::default()).unwrap();
    let ids = u32s(&expected()["strings"][2]["ids"]);
    let last = |dtype| {
        let engine = InferenceModel::from_model_with(&model, dtype);
        let mut cache = KvCache::new(&engine.dims, vec![0], ids.len());
        engine.forward(&mut cache, &ids, ids.len(), LogitsAt::Last).unwrap()
    };
    let (a, b) = (last(WeightDtype::F32), last(WeightDtype::F16));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 0.05, "max |f16 − f32| logit difference {worst}");
}
