//! PEFT LoRA adapters load as their base with the adapter merged: the logits PEFT's own
//! (unmerged) forward gives on `tests/fixtures/peft-*-tiny` (`scripts/fixtures/peft_tiny.py`:
//! a Llama adapter with an embedding LoRA, per-module rank/alpha and a whole new `lm_head`; a
//! GPT-2 one with rsLoRA on Conv1D layers, c_attn's fused q|k|v and trained biases; DoRA
//! adapters over both), and the errors for what is not read.

mod common;

use std::path::Path;

use common::*;
use dfdx::prelude::*;
use rlhf_policies::checkpoint::{load_with_tokenizer, read_safetensors};
use rlhf_policies::half::f32_to_bf16;
use rlhf_policies::peft::{resolve_base_in, AdapterConfig, ADAPTER_CONFIG};
use rlhf_policies::{Batch, CausalLm};

/// The shared fixture the adapter fixture `name` adapts (`peft-llama-dora-tiny` → `hf-llama-tiny`).
fn base_of(name: &str) -> String {
    name.replace("peft-", "hf-").replace("-dora", "")
}

/// A copy of the adapter fixture `name` in a temporary folder, its base named by `base` (the
/// shared fixture's absolute path unless given), with `edit` applied to its config.
fn adapter_copy(name: &str, base: Option<&str>, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join(ADAPTER_CONFIG);
    let mut cfg = read_json(&path);
    let shared_base = || shared().join("fixtures").join(base_of(name)).canonicalize().unwrap();
    cfg["base_model_name_or_path"] =
        base.map(str::to_string).unwrap_or_else(|| shared_base().display().to_string()).into();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dir
}

fn logits(model: &CausalLm<Cpu>, ids: &[u32]) -> Vec<f32> {
    model.forward(&Batch::unpadded(&[ids.to_vec()]).unwrap(), NoneTape).unwrap().as_vec()
}

/// The adapter fixture `name` loads with logits within 1e-4 of PEFT's, which are at least
/// `moves` from the base model's.
fn check_against_peft(name: &str, moves: f32) {
    let dir = adapter_copy(name, None, |_| {});
    let (model, tok) = load_with_tokenizer(dir.path(), &Cpu::default()).expect("adapter loads");
    assert_eq!(tok.vocab_size(), 512, "the base's tokenizer");
    let base = CausalLm::load_pretrained(&shared().join("fixtures").join(base_of(name)), &Cpu::default()).unwrap();
    for text in read_json(&fixture(name).join("expected.json"))["texts"].as_array().unwrap() {
        let ids = u32s(&text["ids"]);
        let (got, want) = (logits(&model, &ids), f32s_2d(&text["logits"]).concat());
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{name}: merged logits differ from PEFT's by {diff}");
        let moved = max_abs_diff(&logits(&base, &ids), &want);
        assert!(moved > moves, "{name}: the adapter moves the logits by only {moved}");
    }
    // the merged model saves as a plain checkpoint and reads back the same
    let out = tempfile::tempdir().unwrap();
    model.save_pretrained(out.path(), Some(&tok)).unwrap();
    let again = CausalLm::load_pretrained(out.path(), &Cpu::default()).unwrap();
    let ids = [5u32, 9, 200, 17];
    assert_eq!(logits(&again, &ids), logits(&model, &ids));
}

#[test]
fn llama_adapter_matches_peft() {
    check_against_peft("peft-llama-tiny", 1.0);
}

#[test]
fn gpt2_conv1d_rslora_adapter_matches_peft() {
    check_against_peft("peft-gpt2-tiny", 1.0);
}

/// DoRA: each adapted output's weights rescaled to its magnitude — on Llama's linear layers and
/// embedding, and GPT-2's `(in, out)` Conv1D layers. Merged as plain LoRA (the magnitudes
/// dropped) the logits miss PEFT's by far more than the tolerance.
#[test]
fn dora_adapters_match_peft() {
    use rlhf_policies::checkpoint::{read_safetensors, write_safetensors};
    for name in ["peft-llama-dora-tiny", "peft-gpt2-dora-tiny"] {
        check_against_peft(name, 0.5);
        let plain = adapter_copy(name, None, |c| c["use_dora"] = false.into());
        let file = plain.path().join("adapter_model.safetensors");
        let mut tensors = read_safetensors(&file).unwrap();
        tensors.retain(|k, _| !k.ends_with("lora_magnitude_vector"));
        write_safetensors(&file, &tensors).unwrap();
        let (model, _) = load_with_tokenizer(plain.path(), &Cpu::default()).unwrap();
        let text = &read_json(&fixture(name).join("expected.json"))["texts"][0];
        let off = max_abs_diff(&logits(&model, &u32s(&text["ids"])), &f32s_2d(&text["logits"]).concat());
        assert!(off > 0.3, "{name}: without its magnitudes the adapter is off by only {off}");
    }
    // a magnitude the config does not call for, or the other way round
    let err = load_err(adapter_copy("peft-gpt2-dora-tiny", None, |c| c["use_dora"] = false.into()).path());
    assert!(err.contains("c_attn") && err.contains("has no `use_dora`"), "{err}");
    let dir = adapter_copy("peft-gpt2-dora-tiny", None, |_| {});
    let file = dir.path().join("adapter_model.safetensors");
    let mut tensors = read_safetensors(&file).unwrap();
    tensors.retain(|k, _| !k.ends_with("h.1.mlp.c_fc.lora_magnitude_vector"));
    write_safetensors(&file, &tensors).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("h.1.mlp.c_fc") && err.contains("no DoRA magnitude"), "{err}");
}

/// `rlhf export`: an adapter merged into a plain HF folder (PEFT's logits), a GGUF file
/// dequantised (the same logits as read from the GGUF), and no folder overwritten.
#[test]
fn export_writes_plain_model_folders() {
    let export_as = |model: &Path, out: &Path, dtype: &str| {
        let (model, out) = (model.display().to_string(), out.display().to_string());
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args(["export", "--model", &model, "--out", &out, "--dtype", dtype])
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (o.status.success(), text(&o.stdout), text(&o.stderr))
    };
    let export = |model: &Path, out: &Path| export_as(model, out, "f32");
    let d = tempfile::tempdir().unwrap();
    let adapter = adapter_copy("peft-llama-dora-tiny", None, |_| {});
    let (ok, stdout, stderr) = export(adapter.path(), &d.path().join("merged"));
    assert!(ok && stdout.contains("a llama causal LM"), "{stdout}{stderr}");
    let merged = CausalLm::load_pretrained(&d.path().join("merged"), &Cpu::default()).unwrap();
    let text = &read_json(&fixture("peft-llama-dora-tiny").join("expected.json"))["texts"][0];
    let diff = max_abs_diff(&logits(&merged, &u32s(&text["ids"])), &f32s_2d(&text["logits"]).concat());
    assert!(diff < 1e-4, "the exported folder against PEFT's logits: {diff}");
    assert!(d.path().join("merged/tokenizer.json").is_file());
    let gguf = fixture("gguf-llama3-tiny.gguf");
    let (ok, stdout, stderr) = export(&gguf, &d.path().join("from-gguf"));
    assert!(ok, "{stdout}{stderr}");
    let (a, _) = load_with_tokenizer(&gguf, &Cpu::default()).unwrap();
    let (b, _) = load_with_tokenizer(&d.path().join("from-gguf"), &Cpu::default()).unwrap();
    assert_eq!(logits(&a, &[1, 2, 3, 4]), logits(&b, &[1, 2, 3, 4]));
    let (ok, _, stderr) = export(&gguf, &d.path().join("merged"));
    assert!(!ok && stderr.contains("already holds a model"), "{stderr}");
    // bf16: every value the f32 export's rounded to nearest even, and the config says so
    let (ok, stdout, stderr) = export_as(&gguf, &d.path().join("bf16"), "bf16");
    assert!(ok && stdout.contains("in bfloat16"), "{stdout}{stderr}");
    assert_eq!(read_json(&d.path().join("bf16/config.json"))["torch_dtype"], "bfloat16");
    let read = |dir: &str| read_safetensors(&d.path().join(dir).join("model.safetensors")).unwrap();
    let (full, half) = (read("from-gguf"), read("bf16"));
    for (name, t) in &full {
        let want: Vec<f32> = t.data.iter().map(|v| f32::from_bits((f32_to_bf16(*v) as u32) << 16)).collect();
        assert_eq!(half[name].data, want, "{name}");
    }
    let bytes = |dir: &str| std::fs::metadata(d.path().join(dir).join("model.safetensors")).unwrap().len();
    assert!(bytes("bf16") * 2 < bytes("from-gguf") + 4096, "half the size");
}

#[test]
fn base_found_beside_the_adapter_and_in_the_hub_cache() {
    let root = tempfile::tempdir().unwrap();
    let base = shared().join("fixtures/hf-llama-tiny").canonicalize().unwrap();
    // relative to the adapter's folder
    let adapter = root.path().join("adapters/mine");
    std::fs::create_dir_all(&adapter).unwrap();
    std::os::unix::fs::symlink(&base, root.path().join("adapters/base")).unwrap();
    let cfg = |b: &str, revision: Option<&str>| AdapterConfig {
        base: b.into(),
        revision: revision.map(Into::into),
        task_type: None,
        alpha: 8.0,
        rslora: false,
        fan_in_fan_out: false,
        dora: false,
        alpha_pattern: vec![],
    };
    assert_eq!(resolve_base_in(&adapter, &cfg("../base", None), None).unwrap(), adapter.join("../base"));
    // a Hub id in the cache's layout: refs/<revision> names the snapshot
    let cache = root.path().join("hub");
    let repo = cache.join("models--acme--tiny-llama");
    for (rev, commit) in [("main", "abc123"), ("v2", "def456")] {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(rev), commit).unwrap();
        std::fs::create_dir_all(repo.join("snapshots")).unwrap();
        std::os::unix::fs::symlink(&base, repo.join("snapshots").join(commit)).unwrap();
    }
    let found = |rev| resolve_base_in(&adapter, &cfg("acme/tiny-llama", rev), Some(&cache)).unwrap();
    assert_eq!(found(None), repo.join("snapshots/abc123"));
    assert_eq!(found(Some("v2")), repo.join("snapshots/def456"));
    let err = resolve_base_in(&adapter, &cfg("acme/other", None), Some(&cache)).unwrap_err().to_string();
    assert!(err.contains("base_model_name_or_path") && err.contains("\"acme/other\" not found"), "{err}");
    assert!(err.contains("models--acme--other"), "names where it looked: {err}");
}

fn load_err(dir: &Path) -> String {
    load_with_tokenizer(dir, &Cpu::default()).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn what_is_not_read_is_refused_by_name() {
    let set = |field: &'static str, v: serde_json::Value| move |c: &mut serde_json::Value| c[field] = v;
    for (field, value, says) in [
        ("peft_type", serde_json::json!("IA3"), "only LoRA adapters"),
        ("alora_invocation_tokens", serde_json::json!([5, 6]), "aLoRA"),
        ("layer_replication", serde_json::json!([[0, 2]]), "replicated layers"),
        ("lora_alpha", serde_json::Value::Null, "missing or not a number"),
    ] {
        let dir = adapter_copy("peft-llama-tiny", None, set(field, value));
        let err = load_err(dir.path());
        assert!(err.contains(ADAPTER_CONFIG) && err.contains(field) && err.contains(says), "{field}: {err}");
    }
    // a base that is not there
    let dir = adapter_copy("peft-llama-tiny", Some("/nowhere/base"), |_| {});
    assert!(load_err(dir.path()).contains("\"/nowhere/base\" not found"));
    // a pickled adapter
    let dir = adapter_copy("peft-llama-tiny", None, |_| {});
    std::fs::rename(dir.path().join("adapter_model.safetensors"), dir.path().join("adapter_model.bin")).unwrap();
    assert!(load_err(dir.path()).contains("pickled"));
    // an adapter for another model: the GPT-2 adapter's c_attn over the Llama base
    let dir =
        adapter_copy("peft-gpt2-tiny", Some(&shared().join("fixtures/hf-llama-tiny").display().to_string()), |_| {});
    let err = load_err(dir.path());
    assert!(err.contains("transformer.h.0.attn.c_attn") && err.contains("does not have"), "{err}");
    // a folder with weights of its own is that model, whatever else it holds
    let full = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(shared().join("fixtures/hf-llama-tiny").join(f), full.path().join(f)).unwrap();
    }
    std::fs::copy(fixture("peft-llama-tiny").join(ADAPTER_CONFIG), full.path().join(ADAPTER_CONFIG)).unwrap();
    let plain = CausalLm::load_pretrained(&shared().join("fixtures/hf-llama-tiny"), &Cpu::default()).unwrap();
    let read = CausalLm::load_pretrained(full.path(), &Cpu::default()).unwrap();
    assert_eq!(logits(&read, &[1, 2, 3]), logits(&plain, &[1, 2, 3]));
}

#[test]
fn reward_model_adapter_matches_peft() {
    use rlhf_policies::reward_model::LearnedReward;
    let dir = adapter_copy(
        "peft-llama-rm-tiny",
        Some(&shared().join("fixtures/hf-llama-tiny").display().to_string()),
        |_| {},
    );
    assert!(rlhf::eval::is_reward_model(dir.path()).unwrap(), "a SEQ_CLS adapter is a reward model");
    assert!(!rlhf::eval::is_reward_model(&fixture("peft-llama-tiny")).unwrap());
    let (rm, norm) = LearnedReward::load_pretrained(dir.path(), &Cpu::default()).expect("reward adapter loads");
    assert!(norm.is_none());
    let texts = read_json(&fixture("peft-llama-rm-tiny").join("expected.json"))["texts"].as_array().unwrap().clone();
    let seqs: Vec<Vec<u32>> = texts.iter().map(|t| u32s(&t["ids"])).collect();
    let got = rm.score_ids(&seqs).unwrap();
    for (g, t) in got.iter().zip(&texts) {
        let want = t["score"].as_f64().unwrap() as f32;
        assert!((g - want).abs() < 1e-4, "score {g} against PEFT's {want}");
    }
}
