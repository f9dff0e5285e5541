//! Qwen2, Qwen3, Llama 3, Llama 2, Gemma 3, Phi-3, SmolLM3 and GPT-NeoX GGUF files, written by llama.cpp's
//! own converter from tiny HF models (`scripts/fixtures/gguf_tiny.py` and `gguf_spm_tiny.py`,
//! f32): the model loads with the logits transformers gives (Qwen2's biases, Qwen3's head norms,
//! Llama 3's RoPE scaling recovered from `rope_freqs.weight`, Gemma 3's norms and windows,
//! Phi-3's fused projections, window, partial RoPE and LongRoPE, GPT-NeoX's reordered q|k|v),
//! the vocabulary
//! tokenizes as the model's own tokenizer does (Qwen2's and Llama 3's digit splits, added tokens
//! kept whole, Llama 3's BOS; SentencePiece vocabularies as llama.cpp tokenizes with them, Phi-3's
//! real one against llama.cpp's test vectors), and a checkpoint written from the GGUF model loads
//! back with the same logits.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf_policies::checkpoint::load_with_tokenizer;
use rlhf_policies::dims::GeluKind;
use rlhf_policies::{Batch, CausalLm};
use serde_json::Value;

fn case(name: &str) -> Value {
    let all = read_json(&fixture(if [LLAMA2, GEMMA3, GEMMA2].contains(&name) {
        "gguf_spm_tiny.json"
    } else {
        "gguf_tiny.json"
    }));
    all["cases"].as_array().unwrap().iter().find(|c| c["file"] == format!("gguf-{name}.gguf")).unwrap().clone()
}

/// The SentencePiece-vocabulary files: `hf-llama-tiny`'s weights, and a Gemma 3 and a Gemma 2
/// whose transformers logits the fixture records itself.
const LLAMA2: &str = "llama2-tiny";
const GEMMA3: &str = "gemma3-tiny";
const GEMMA2: &str = "gemma2-tiny";

/// The largest logit difference from transformers' on the HF fixture's texts (the GGUF
/// fixture's own for the Gemmas).
fn worst_logit_difference(model: &CausalLm<Cpu>, name: &str) -> f32 {
    let expected = match name {
        GEMMA3 | GEMMA2 => case(name),
        LLAMA2 => read_json(&fixture("hf-llama-tiny/expected.json")),
        _ => read_json(&fixture(&format!("hf-{name}/expected.json"))),
    };
    let mut worst = 0.0f32;
    for text in expected["texts"].as_array().unwrap() {
        let ids = u32s(&text["ids"]);
        let got = model.forward(&Batch::unpadded(std::slice::from_ref(&ids)).unwrap(), NoneTape).unwrap().as_vec();
        worst = worst.max(max_abs_diff(&got, &f32s_2d(&text["logits"]).concat()));
    }
    worst
}

fn check(name: &str) -> (CausalLm<Cpu>, rlhf_policies::Tokenizer) {
    let c = case(name);
    let path = fixture(c["file"].as_str().unwrap());
    let (model, tok) = load_with_tokenizer(&path, &Cpu::default()).unwrap();
    let diff = worst_logit_difference(&model, name);
    assert!(diff < 1e-4, "{name}: logits differ from transformers' by {diff}");
    for s in c["strings"].as_array().unwrap() {
        let (text, mut ids) = (s["text"].as_str().unwrap(), u32s(&s["ids"]));
        assert_eq!(tok.decode(&ids).unwrap(), s["decoded"].as_str().unwrap(), "{name}: decoding {text:?}");
        // the original tokenizer's ids include the BOS its post-processor adds
        if let Some(bos) = tok.bos_prefix() {
            assert_eq!(ids.remove(0), bos, "{name}: {text:?} starts with BOS");
        }
        assert_eq!(tok.encode(text).unwrap(), ids, "{name}: {text:?}");
    }
    // a checkpoint written from the GGUF model reads back as the same model
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path(), Some(&tok)).unwrap();
    let (again, again_tok) = load_with_tokenizer(dir.path(), &Cpu::default()).unwrap();
    assert_eq!(again.config, model.config, "{name}: config.json round trip");
    assert_eq!(worst_logit_difference(&again, name), diff, "{name}: saved checkpoint");
    assert!(again_tok.same_vocabulary(&tok) && again_tok.bos_prefix() == tok.bos_prefix());
    (model, tok)
}

#[test]
fn qwen2_gguf_matches_transformers_with_its_biases_and_digit_split() {
    let (model, tok) = check("qwen2-tiny");
    assert!(model.dims.qkv_bias && model.dims.rope_scaling.is_none());
    assert_eq!(tok.bos_prefix(), None);
    // `<think>` an added token that is not special, kept whole
    let think = tok.token_to_id("<think>").unwrap();
    assert_eq!(tok.encode("<think>").unwrap(), [think]);
}

#[test]
fn qwen3_gguf_matches_transformers_with_its_head_norms() {
    let (model, _) = check("qwen3-tiny");
    assert!(model.dims.qk_norm && model.dims.head_dim == 24);
    assert!(matches!(model.config, rlhf_policies::ModelConfig::Qwen3(_)));
}

#[test]
fn llama3_gguf_recovers_the_rope_scaling_and_adds_bos() {
    let (model, tok) = check("llama3-tiny");
    let Some(rlhf_policies::rope::RopeScaling::Llama3(scaling)) = model.dims.rope_scaling else {
        panic!("rope_freqs.weight not read as Llama 3's scaling: {:?}", model.dims.rope_scaling);
    };
    assert_eq!(scaling.factor, 8.0);
    // the file's divisors, reproduced
    let freqs = rlhf_policies::rope::inv_freq(&model.dims);
    let base = rlhf_policies::rope::unscaled_inv_freq(model.dims.head_dim, model.dims.rope_theta);
    for ((f, b), r) in freqs.iter().zip(&base).zip(f32s(&case("llama3-tiny")["rope_freqs"])) {
        assert!((b / f - r).abs() < 1e-5 * r, "divisor {} vs {r}", b / f);
    }
    assert_eq!(tok.bos_prefix(), Some(0));
    // digits in threes before the merges: 100|000|0 → 1 00|00 0|0 (GPT-2's split, one run of
    // digits, gives 1 00 00 00; Qwen2's, digit by digit, seven tokens)
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(tok.encode("1000000").unwrap(), [id("1"), id("00"), id("00"), id("0"), id("0")]);
    assert_eq!(model.config.eos_token_ids(), [1]);
}

/// Phi-3's `attn_qkv` and `ffn_up` (gate | up) split as transformers' fused projections, its
/// window from `attention.sliding_window` (0: none), Phi-4-mini's partial RoPE from
/// `rope.dimension_count` and its LongRoPE from the `rope_factors_*` tensors and
/// `rope.scaling.*` metadata (the same scaling as transformers' config gives); a file with
/// one of the two factor tensors is refused by name.
#[test]
fn phi3_gguf_matches_transformers_with_its_fused_projections() {
    for (name, window, rotary) in [("phi3-tiny", Some(8), None), ("phi4-mini-tiny", None, Some(12))] {
        let (model, _) = check(name);
        let d = model.dims;
        assert!(matches!(model.config, rlhf_policies::ModelConfig::Phi3(_)) && d.fused_projections, "{name}");
        assert_eq!((d.sliding_window, d.partial_rotary, d.tied), (window, rotary, rotary.is_some()), "{name}");
        let hf = rlhf_policies::ModelConfig::from_file(&fixture(&format!("hf-{name}")).join("config.json"));
        let hf = hf.unwrap().dims().unwrap();
        assert_eq!((d.rope_scaling, d.position_limit()), (hf.rope_scaling, hf.position_limit()), "{name}");
    }
    let mut g = rlhf_policies::gguf::Gguf::open(&fixture("gguf-phi4-mini-tiny.gguf")).unwrap();
    g.tensors.retain(|t| t.name != "rope_factors_short.weight");
    let err = rlhf_policies::gguf::model_config(&g).unwrap_err().to_string();
    assert!(err.contains("rope_factors_long.weight") && err.contains("short and the long"), "{err}");
}

/// SmolLM3 as llama.cpp's converter writes it: Llama's file (q/k rows un-permuted), RoPE left
/// out of every fourth layer as llama.cpp does (no key records it), Llama 3's vocabulary.
#[test]
fn smollm3_gguf_matches_transformers() {
    let (model, tok) = check("smollm3-tiny");
    assert!(matches!(model.config, rlhf_policies::ModelConfig::Smollm3(_)));
    assert_eq!(model.blocks.iter().map(|b| b.rope).collect::<Vec<_>>(), [true, true, true, false]);
    assert_eq!(tok.bos_prefix(), Some(0));
}

/// Granite as llama.cpp's converter writes it: Llama's file (q/k rows un-permuted) with the four
/// multipliers; without `attention.scale` llama.cpp scales the scores by `head_dim^-½`, and
/// `logit_scale` it requires.
#[test]
fn granite_gguf_matches_transformers_with_its_multipliers() {
    use rlhf_policies::gguf::{model_config, Gguf};
    let (model, tok) = check("granite-tiny");
    let d = model.dims;
    assert!(matches!(model.config, rlhf_policies::ModelConfig::Granite(_)));
    assert_eq!((d.embed_scale, d.query_scale, d.residual_scale), (4.0, 4.0, 0.5));
    assert!((d.logit_scale - 1.0 / 3.0).abs() < 1e-7);
    assert_eq!(tok.bos_prefix(), Some(0));
    let mut g = Gguf::open(&fixture("gguf-granite-tiny.gguf")).unwrap();
    for key in ["granite.attention.scale", "granite.embedding_scale", "granite.residual_scale"] {
        g.metadata.remove(key);
    }
    let d = model_config(&g).unwrap().dims().unwrap();
    assert_eq!((d.embed_scale, d.query_scale, d.residual_scale), (1.0, 1.0, 1.0));
    g.metadata.remove("granite.logit_scale");
    let e = model_config(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-granite-tiny.gguf") && e.contains("granite.logit_scale"), "{e}");
}

/// YaRN as llama.cpp's converter writes it (`rope.scaling.type = yarn`, the factor and the
/// pretrained context) on a Qwen3 file: the logits of transformers' YaRN model; the betas and
/// the attention factor when a file gives them; an extrapolation factor other than 1 refused.
#[test]
fn qwen3_yarn_gguf_matches_transformers() {
    use rlhf_policies::gguf::{model_config, Gguf, Value as Meta};
    use rlhf_policies::rope::RopeScaling;
    let (model, _) = check("qwen3-yarn-tiny");
    let Some(RopeScaling::Yarn(y)) = model.dims.rope_scaling else { panic!("{:?}", model.dims.rope_scaling) };
    assert_eq!((y.factor, y.original_max_position_embeddings, y.beta_fast), (4.0, 1024, 32.0));
    let mut g = Gguf::open(&fixture("gguf-qwen3-yarn-tiny.gguf")).unwrap();
    g.metadata.insert("qwen3.rope.scaling.yarn_beta_fast".into(), Meta::Float(16.0));
    g.metadata.insert("qwen3.rope.scaling.yarn_attn_factor".into(), Meta::Float(1.5));
    let Some(RopeScaling::Yarn(y)) = model_config(&g).unwrap().dims().unwrap().rope_scaling else { panic!() };
    assert_eq!((y.beta_fast, y.attention_factor), (16.0, 1.5));
    g.metadata.insert("qwen3.rope.scaling.yarn_ext_factor".into(), Meta::Float(0.5));
    let e = model_config(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-qwen3-yarn-tiny.gguf") && e.contains("yarn_ext_factor"), "{e}");
}

/// OLMo 2 as llama.cpp's converter writes it: no input norms, the output norms and whole-row q/k
/// norms under llama.cpp's names, rows not permuted; OLMo 3's windows are refused by name.
#[test]
fn olmo2_gguf_matches_transformers_with_its_post_norms() {
    use rlhf_policies::gguf::{model_config, Gguf, Value as Meta};
    let (model, _) = check("olmo2-tiny");
    assert!(matches!(model.config, rlhf_policies::ModelConfig::Olmo2(_)));
    assert!(!model.dims.pre_norms && model.dims.qk_norm_full && !model.dims.tied);
    let mut g = Gguf::open(&fixture("gguf-olmo2-tiny.gguf")).unwrap();
    g.metadata.insert("olmo2.attention.sliding_window".into(), Meta::Int(4096));
    let e = model_config(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-olmo2-tiny.gguf") && e.contains("sliding_window"), "{e}");
}

/// GPT-NeoX (Pythia) as llama.cpp's converter writes it: `attn_qkv` back head by head, RoPE on
/// 4 of each head's 16 dimensions, the parallel residual, the untied `output.weight`, the exact
/// GELU; its `olmo` vocabulary split as GPT-2's.
#[test]
fn gpt_neox_gguf_matches_transformers() {
    let (model, tok) = check("pythia-tiny");
    let d = model.dims;
    assert!(matches!(model.config, rlhf_policies::ModelConfig::GptNeox(_)));
    assert_eq!((d.partial_rotary, d.parallel_residual, d.tied, d.gelu), (Some(4), true, false, GeluKind::Erf));
    assert_eq!((tok.bos_prefix(), model.config.eos_token_ids()), (None, vec![0]));
}

/// Llama 2's vocabulary (SentencePiece BPE: scores, no merges) tokenizes as llama.cpp does with
/// it: a space in front of the text and of each stretch after a special token, BPE by score,
/// byte fallback for characters outside the vocabulary, control and user-defined tokens whole.
#[test]
fn llama2_gguf_tokenizes_its_sentencepiece_vocabulary_as_llama_cpp() {
    let (model, tok) = check(LLAMA2);
    assert_eq!((tok.bos_prefix(), model.config.eos_token_ids()), (Some(1), vec![2]));
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(tok.encode("[INST]<think>").unwrap(), [id("[INST]"), id("<think>")]);
    // 東 is outside the vocabulary: its three UTF-8 bytes
    let ids = tok.encode("東").unwrap();
    assert_eq!(ids[1..], [id("<0xE6>"), id("<0x9D>"), id("<0xB1>")]);
    assert_eq!(tok.decode(&ids).unwrap(), "東");
    // transformers' own tokenizer (its Metaspace) differs only where a stretch of text starts
    // with a space (the fixture script checks the rest)
    let c = case(LLAMA2);
    let differs: Vec<&str> = c["strings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ids"] != s["transformers_ids"])
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let led_by_a_space = ["  leading spaces,\ttabs\t\tand\n\n\nnewlines  \n  end ", " a leading space"];
    assert_eq!(differs, [led_by_a_space[0], led_by_a_space[1], "[INST] Who art thou? [/INST] A citizen.</s>"]);
}

/// Gemma 3 from llama.cpp's converter: the norms stored as `1 + w` come back as `w`, five
/// sliding-window layers (window 8, RoPE base 100) then a full one, the query scale of the head
/// width, a vocabulary without the space prefix and with Gemma's BOS 2 / EOS 1.
#[test]
fn gemma3_gguf_matches_transformers_with_its_windows_and_norm_gains() {
    let (model, tok) = check(GEMMA3);
    let d = &model.dims;
    assert!(d.norm_unit_offset && d.post_norms && d.qk_norm);
    // query_pre_attn_scalar = the head width: no change to `1/√Dh`
    assert_eq!((d.sliding_window, d.rope_local_theta, d.query_scale), (Some(8), Some(100.0), 1.0));
    let windows = model.config.layer_windows().unwrap();
    assert_eq!(windows, [Some(8), Some(8), Some(8), Some(8), Some(8), None]);
    assert_eq!((tok.bos_prefix(), model.config.eos_token_ids()), (Some(2), vec![1]));
    assert_eq!(tok.encode("x").unwrap(), [tok.token_to_id("x").unwrap()]);
}

/// What a `gemma3` file may say beyond the fixture: another layer pattern (a period, or one flag
/// per layer), no window, linear RoPE scaling; other scalings and a final logit softcap are
/// refused by name.
#[test]
fn gemma3_gguf_layer_patterns_and_refusals() {
    use rlhf_policies::gguf::{model_config, Gguf, Value as Meta};
    use rlhf_policies::rope::RopeScaling;
    let mut g = Gguf::open(&fixture("gguf-gemma3-tiny.gguf")).unwrap();
    let windows = |g: &Gguf| model_config(g).unwrap().layer_windows().unwrap();
    g.metadata.insert("gemma3.attention.sliding_window_pattern".into(), Meta::Int(2));
    assert_eq!(windows(&g), [Some(8), None, Some(8), None, Some(8), None]);
    let flags = [true, false, false, true, true, false].map(Meta::Bool).to_vec();
    g.metadata.insert("gemma3.attention.sliding_window_pattern".into(), Meta::Array(flags));
    assert_eq!(windows(&g), [Some(8), None, None, Some(8), Some(8), None]);
    g.metadata.remove("gemma3.attention.sliding_window");
    assert_eq!(windows(&g), [None; 6]);
    // gemma-3-4b's linear scaling, on the full layers only; another kind is refused by name
    g.metadata.insert("gemma3.rope.scaling.type".into(), Meta::Str("linear".into()));
    g.metadata.insert("gemma3.rope.scaling.factor".into(), Meta::Float(8.0));
    let d = model_config(&g).unwrap().dims().unwrap();
    assert_eq!((d.rope_scaling, d.local_rope().rope_scaling), (Some(RopeScaling::Linear { factor: 8.0 }), None));
    g.metadata.insert("gemma3.rope.scaling.type".into(), Meta::Str("yarn".into()));
    let e = model_config(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-gemma3-tiny.gguf") && e.contains("yarn") && e.contains("rope.scaling.type"), "{e}");
    g.metadata.remove("gemma3.rope.scaling.type");
    g.metadata.insert("gemma3.final_logit_softcapping".into(), Meta::Float(30.0));
    let e = model_config(&g).unwrap_err().to_string();
    assert!(e.contains("final_logit_softcapping"), "{e}");
    g.metadata.remove("gemma3.final_logit_softcapping");
    // a value of the wrong kind is an error naming it, not the default
    for key in ["gemma3.rope.freq_base_swa", "tokenizer.ggml.bos_token_id"] {
        let mut bad = Gguf::open(&fixture("gguf-gemma3-tiny.gguf")).unwrap();
        bad.metadata.insert(key.into(), Meta::Str("ten".into()));
        let e = model_config(&bad).unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
}

/// Gemma 2 from llama.cpp's converter: the gains stored as `1 + w` come back as `w`, local and
/// global layers alternate (window 8) with one RoPE base, the soft caps (tight here: 1 and 2)
/// come from the file; the pattern and caps llama.cpp assumes when a file leaves them out.
#[test]
fn gemma2_gguf_matches_transformers_with_its_soft_caps_and_alternating_windows() {
    use rlhf_policies::gguf::{model_config, Gguf, Value as Meta};
    let (model, tok) = check(GEMMA2);
    let d = &model.dims;
    assert!(d.norm_unit_offset && d.post_norms && !d.qk_norm && d.query_scale == 1.0);
    assert_eq!((d.attn_softcap, d.final_softcap, d.rope_local_theta), (Some(1.0), Some(2.0), None));
    assert_eq!(model.config.layer_windows().unwrap(), [Some(8), None, Some(8), None]);
    assert_eq!((tok.bos_prefix(), model.config.eos_token_ids()), (Some(2), vec![1]));
    let mut g = Gguf::open(&fixture("gguf-gemma2-tiny.gguf")).unwrap();
    for key in ["gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping", "gemma2.attention.sliding_window"] {
        g.metadata.remove(key);
    }
    let cfg = model_config(&g).unwrap();
    let d = cfg.dims().unwrap();
    assert_eq!((d.attn_softcap, d.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!(cfg.layer_windows().unwrap(), [Some(4096), None, Some(4096), None]);
    g.metadata.insert("gemma2.attention.sliding_window_pattern".into(), Meta::Int(4));
    assert_eq!(model_config(&g).unwrap().layer_windows().unwrap(), [Some(4096), Some(4096), Some(4096), None]);
    g.metadata.insert("gemma2.rope.freq_base_swa".into(), Meta::Float(100.0));
    let e = model_config(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-gemma2-tiny.gguf") && e.contains("freq_base_swa"), "{e}");
}

/// llama.cpp's own test vectors for a vocabulary (`tests/fixtures/llama.cpp-vocab`): its 46
/// texts — spaces, tabs and newlines in runs, accents, CJK, emoji, code — give the ids of the
/// model's own tokenizer (`encode` adds no BOS), and decode back to the text. Returns the tokenizer.
fn llama_cpp_vectors(name: &str) -> rlhf_policies::Tokenizer {
    use rlhf_policies::gguf::{tokenizer_json, Gguf};
    let dir = fixture("llama.cpp-vocab");
    let g = Gguf::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    let tok = rlhf_policies::Tokenizer::from_json(&tokenizer_json(&g).unwrap(), name).unwrap();
    let inputs = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let outputs = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    // each text is followed by the separator line
    let texts: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let want: Vec<Vec<u32>> =
        outputs.lines().map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect()).collect();
    assert_eq!((texts.len(), texts.last(), want.len()), (47, Some(&""), 46), "{name}");
    for (text, want) in texts.iter().zip(&want) {
        let ids = tok.encode(text).unwrap();
        assert_eq!(&ids, want, "{name}: {text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), *text, "{name}: decoding {text:?}");
    }
    tok
}

/// Phi-3's vocabulary: Llama 2's SentencePiece tokens and Phi-3's chat tokens, BOS added.
#[test]
fn phi3_vocabulary_matches_llama_cpp_test_vectors() {
    let tok = llama_cpp_vectors("phi-3");
    assert_eq!((tok.vocab_size(), tok.bos_prefix()), (32064, Some(1)));
}

/// GPT-NeoX-20B's byte-level vocabulary (Pythia's and OLMo's, here under MPT's `mpt` name), and
/// Falcon's (punctuation runs apart, digits in threes): llama.cpp's test vectors.
#[test]
fn gpt_neox_and_falcon_vocabularies_match_llama_cpp_test_vectors() {
    for (name, vocab) in [("mpt", 50432), ("falcon", 65024)] {
        let tok = llama_cpp_vectors(name);
        assert_eq!((tok.vocab_size(), tok.bos_prefix()), (vocab, None), "{name}");
    }
}

/// llama.cpp's Llama 3 pre-tokenizer takes a word that is itself a token whole, even where the
/// merges would not reach it (Llama 3's tokenizer.json sets `ignore_merges`), and adds BOS when
/// the file does not say; DBRX's name, with the same split, merges as usual.
#[test]
fn llama3_pre_tokenizer_takes_whole_word_tokens() {
    use rlhf_policies::gguf::{tokenizer_json, Gguf, Value as Meta};
    let mut g = Gguf::open(&fixture("gguf-llama3-tiny.gguf")).unwrap();
    // a token no merge makes, appended (a normal token)
    for (key, value) in [("tokens", Meta::Str("Ġzqxj".into())), ("token_type", Meta::Int(1))] {
        let Some(Meta::Array(items)) = g.metadata.get_mut(&format!("tokenizer.ggml.{key}")) else { panic!("{key}") };
        items.push(value);
    }
    let last = 512;
    g.metadata.remove("tokenizer.ggml.add_bos_token");
    let build = |g: &Gguf| rlhf_policies::Tokenizer::from_json(&tokenizer_json(g).unwrap(), "gguf").unwrap();
    let llama3 = build(&g);
    assert_eq!(llama3.encode("a zqxj").unwrap()[1..], [last]);
    assert_eq!(llama3.bos_prefix(), Some(0));
    g.metadata.insert("tokenizer.ggml.pre".into(), Meta::Str("dbrx".into()));
    let dbrx = build(&g);
    assert!(dbrx.encode("a zqxj").unwrap().len() > 2 && dbrx.bos_prefix().is_none());
}

/// Without the space prefix (Gemma's vocabulary) the text starts as it is, and decoding keeps
/// its first character; without `add_bos_token` llama.cpp still adds BOS to a SentencePiece text.
#[test]
fn sentencepiece_flags_change_the_prefix_and_the_bos() {
    use rlhf_policies::gguf::{tokenizer_json, Gguf, Value as Meta};
    let mut g = Gguf::open(&fixture("gguf-llama2-tiny.gguf")).unwrap();
    let build = |g: &Gguf| rlhf_policies::Tokenizer::from_json(&tokenizer_json(g).unwrap(), "gguf").unwrap();
    let with_prefix = build(&g);
    g.metadata.insert("tokenizer.ggml.add_space_prefix".into(), Meta::Bool(false));
    g.metadata.remove("tokenizer.ggml.add_bos_token");
    let plain = build(&g);
    let space = with_prefix.token_to_id("▁").unwrap();
    assert_eq!(with_prefix.encode("x").unwrap(), [space, with_prefix.token_to_id("x").unwrap()]);
    assert_eq!(plain.encode("x").unwrap(), [plain.token_to_id("x").unwrap()]);
    assert_eq!(plain.decode(&plain.encode(" said he").unwrap()).unwrap(), " said he");
    assert_eq!(with_prefix.decode(&with_prefix.encode(" said he").unwrap()).unwrap(), " said he");
    assert_eq!(plain.bos_prefix(), Some(1));
    g.metadata.insert("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false));
    assert_eq!(build(&g).bos_prefix(), None);
    // a character outside a vocabulary with neither byte tokens nor an unknown token could
    // only be dropped: refused
    g.metadata.remove("tokenizer.ggml.unknown_token_id");
    build(&g); // <unk> is typed as a control token here, so nothing names it; the bytes serve
    let Some(Meta::Array(tokens)) = g.metadata.get_mut("tokenizer.ggml.tokens") else { panic!("tokens") };
    tokens[6] = Meta::Str("<0x00>?".into());
    let e = tokenizer_json(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-llama2-tiny.gguf") && e.contains("byte tokens nor an unknown token"), "{e}");
    g.metadata.remove("tokenizer.ggml.scores");
    let e = tokenizer_json(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-llama2-tiny.gguf") && e.contains("tokenizer.ggml.scores"), "{e}");
}

#[test]
fn unknown_pre_tokenizers_and_architectures_are_errors_naming_them() {
    use rlhf_policies::gguf::{model_config, tokenizer_json, Gguf, Value as Meta};
    let mut g = Gguf::open(&fixture("gguf-qwen2-tiny.gguf")).unwrap();
    g.metadata.insert("tokenizer.ggml.pre".into(), Meta::Str("deepseek-llm".into()));
    let e = tokenizer_json(&g).unwrap_err().to_string();
    assert!(e.contains("gguf-qwen2-tiny.gguf") && e.contains("deepseek-llm") && e.contains("tokenizer.json beside"));
    g.metadata.insert("general.architecture".into(), Meta::Str("gpt2".into()));
    let e = model_config(&g).unwrap_err().to_string();
    assert!(
        e.contains("\"gpt2\"")
            && e.contains("llama, qwen2, qwen3, gemma2, gemma3, phi3, smollm3, granite, olmo2 and gptneox"),
        "{e}"
    );
}

/// `rlhf eval` on text scores the file as transformers' `tokenizer(text)` gives it: with
/// Llama 3's BOS in front, the first token predicted from it.
#[test]
fn text_evaluation_puts_the_bos_in_front() {
    let path = fixture("gguf-llama3-tiny.gguf");
    let (model, tok) = load_with_tokenizer(&path, &Cpu::default()).unwrap();
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n";
    let ids = [vec![tok.bos_prefix().unwrap()], tok.encode(text).unwrap()].concat();
    let logits = model.forward(&Batch::unpadded(std::slice::from_ref(&ids)).unwrap(), NoneTape).unwrap().as_vec();
    let v = model.dims.vocab;
    let want: f64 = (0..ids.len() - 1)
        .map(|t| -log_softmax_ref(&logits[t * v..(t + 1) * v])[ids[t + 1] as usize] as f64)
        .sum::<f64>()
        / (ids.len() - 1) as f64;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("text.txt");
    std::fs::write(&data, text).unwrap();
    let d = rlhf::eval::EvalData {
        data,
        block: Some(ids.len() - 1),
        batch: 1,
        fields: ("prompt".into(), "response".into()),
        messages_field: None,
        assistant_turns: Default::default(),
        prompt_template: "{prompt}".into(),
        chat: false,
        format: Default::default(),
    };
    let report = rlhf::eval::evaluate(&path, &d, &Cpu::default()).unwrap();
    assert_eq!(report["tokens"], ids.len() - 1);
    let got = report["loss"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

/// llama.cpp ends a generation at EOS, end-of-turn or end-of-message: the config lists each once.
#[test]
fn end_of_turn_ids_join_the_eos_list_once() {
    use rlhf_policies::gguf::{model_config, Gguf, Value as Meta};
    let mut g = Gguf::open(&fixture("gguf-qwen2-tiny.gguf")).unwrap();
    assert_eq!(model_config(&g).unwrap().eos_token_ids(), [0]);
    g.metadata.insert("tokenizer.ggml.eot_token_id".into(), Meta::Int(2));
    g.metadata.insert("tokenizer.ggml.eom_token_id".into(), Meta::Int(0));
    assert_eq!(model_config(&g).unwrap().eos_token_ids(), [0, 2]);
}
