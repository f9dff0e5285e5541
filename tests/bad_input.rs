//! Bad checkpoints and inputs give errors naming the file and the field or tensor — never a
//! panic.

mod common;

use std::path::Path;

use common::*;
use dfdx::prelude::*;
use rlhf_policies::checkpoint::{load_with_tokenizer, read_safetensors, write_safetensors};
use rlhf_policies::{Batch, CausalLm, PolicyError};

/// A copy of the GPT-2 fixture folder to break.
fn broken_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("hf-gpt2-tiny").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match load_with_tokenizer(dir, &Cpu::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v = read_json(&p);
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_config() {
    let d = broken_copy();
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("No such file"), "{e}");
}

#[test]
fn malformed_config() {
    let d = broken_copy();
    std::fs::write(d.path().join("config.json"), "{ \"model_type\": \"gpt2\", ").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn config_missing_field_or_wrong_type() {
    let d = broken_copy();
    edit_config(d.path(), |v| {
        v.as_object_mut().unwrap().remove("n_embd");
    });
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("n_embd"), "{e}");
    edit_config(d.path(), |v| v["n_embd"] = "sixty-four".into());
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("sixty-four"), "{e}");
}

#[test]
fn config_unsupported_values() {
    let d = broken_copy();
    edit_config(d.path(), |v| v["model_type"] = "mamba".into());
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("model_type") && e.contains("mamba"), "{e}");
    let d = broken_copy();
    edit_config(d.path(), |v| v["n_head"] = 5.into());
    let e = load_err(d.path());
    assert!(e.contains("n_head"), "{e}");
}

#[test]
fn missing_or_truncated_weights() {
    let d = broken_copy();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
    let d = broken_copy();
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
    std::fs::write(&p, b"garbage").unwrap();
    assert!(load_err(d.path()).contains("model.safetensors"));
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let d = broken_copy();
    edit_config(d.path(), |v| v["n_inner"] = 128.into());
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("transformer.h.0.mlp.c_fc.weight") && e.contains("[64, 256]"),
        "{e}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let d = broken_copy();
    let p = d.path().join("model.safetensors");
    let mut t = read_safetensors(&p).unwrap();
    let ln = t.remove("transformer.ln_f.bias").unwrap();
    write_safetensors(&p, &t).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("transformer.ln_f.bias") && e.contains("missing"), "{e}");
    t.insert("transformer.ln_f.bias".into(), ln.clone());
    t.insert("transformer.extra.weight".into(), ln);
    write_safetensors(&p, &t).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("transformer.extra.weight") && e.contains("unexpected"), "{e}");
}

#[test]
fn malformed_or_missing_tokenizer() {
    let d = broken_copy();
    std::fs::write(d.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn vocab_mismatch_between_model_and_tokenizer() {
    let d = broken_copy();
    // a model with a smaller vocabulary than the tokenizer's 512 ids
    let m = CausalLm::new(rlhf_policies::ModelConfig::gpt2_preset(300, 16, 1, 2, 32), &Cpu::default(), 0).unwrap();
    m.save_pretrained(d.path(), None).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("tokenizer.json") && e.contains("vocab_size") && e.contains("512") && e.contains("300"), "{e}");
}

#[test]
fn out_of_range_inputs_are_errors() {
    let m = CausalLm::new(rlhf_policies::ModelConfig::gpt2_preset(10, 16, 1, 2, 4), &Cpu::default(), 0).unwrap();
    let e = m.forward(&Batch::unpadded(&[vec![3, 12]]).unwrap(), NoneTape).unwrap_err();
    assert!(matches!(e, PolicyError::Input(_)) && e.to_string().contains("12"), "{e}");
    let e = m.forward(&Batch::unpadded(&[vec![1; 5]]).unwrap(), NoneTape).unwrap_err();
    assert!(e.to_string().contains("positions"), "{e}");
    assert!(Batch::unpadded(&[vec![1, 2], vec![3]]).is_err());
    let engine = rlhf_policies::InferenceModel::from_model(&m);
    let cfg = rlhf_policies::SamplingConfig { max_new_tokens: 10, ..Default::default() };
    assert!(rlhf_policies::generate(&engine, &[vec![1, 2]], 0, &cfg).is_err(), "past n_positions");
    assert!(rlhf_policies::generate(&engine, &[vec![]], 0, &cfg).is_err(), "empty prompt");
    let bad_t = rlhf_policies::SamplingConfig { temperature: 0.0, ..cfg };
    assert!(rlhf_policies::generate(&engine, &[vec![1]], 0, &bad_t).is_err());
}
