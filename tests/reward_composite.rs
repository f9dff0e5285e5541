//! Composite rewards of the config. `{"kind": "sum", "terms": [...]}`: a weighted sum of any
//! rewards — rules, reward models (each fitted to the policy's tokenizer on its own), nested
//! sums — checked as its terms are (a nested `answer` still needs `reference_field`).
//! `{"kind": "ensemble", "members": [...], "combine": ...}`: the members' scores of each
//! response combined by mean, min or UWO (Coste et al. 2024).

mod common;

use common::pretrained_policy;
use dfdx::prelude::*;
use rlhf::stages::reward_spec::{build_reward, check_reward_inputs, RewardSpec};
use rlhf_envs::{Combine, RewardInput};
use rlhf_policies::{checkpoint::load_with_tokenizer, CausalLm, LearnedReward, ModelConfig, ScalarHead, Tokenizer};

fn spec(json: &str) -> RewardSpec {
    serde_json::from_str(json).unwrap()
}

/// The policy's tokenizer, a reward model with its own (byte-level) tokenizer saved in
/// `dir/rm`, its byte tokenizer, and one input ("the " → "a cat" + EOS 0).
fn setup(dir: &std::path::Path) -> (Tokenizer, std::path::PathBuf, LearnedReward<Cpu>, Tokenizer, RewardInput) {
    let (policy_dir, _) = pretrained_policy(dir);
    let (_, tok) = load_with_tokenizer(&policy_dir, &Cpu::default()).unwrap();
    let bytes = Tokenizer::byte_level().unwrap();
    let rm_dir = dir.join("rm");
    let dev = Cpu::default();
    let model = CausalLm::new(ModelConfig::gpt2_preset(258, 16, 1, 2, 64), &dev, 3).unwrap();
    let rm = LearnedReward { model, head: ScalarHead::new(&dev, 16, 0.5, 4), norm: None, pad_id: 0 };
    rm.save_pretrained(&rm_dir, Some(&bytes), None).unwrap();
    let x = RewardInput {
        prompt: "the ".into(),
        response: "a cat".into(),
        prompt_ids: tok.encode("the ").unwrap(),
        response_ids: [tok.encode("a cat").unwrap(), vec![0]].concat(),
        reference: None,
    };
    (tok, rm_dir, rm, bytes, x)
}

/// The score of `s` alone for the policy's tokenizer.
fn alone(s: &RewardSpec, tok: &Tokenizer, x: &RewardInput) -> f32 {
    let reward = build_reward(Some(s), &Cpu::default()).unwrap().for_policy(tok, &[0]);
    reward.unwrap().score(std::slice::from_ref(x)).unwrap()[0]
}

#[test]
fn a_sum_scores_the_weighted_terms_each_as_it_would_alone() {
    let d = tempfile::tempdir().unwrap();
    let (tok, rm_dir, rm, bytes, x) = setup(d.path());
    let sum = spec(&format!(
        r#"{{"kind": "sum", "terms": [
            {{"weight": 2.0, "reward": {{"kind": "keywords", "keywords": ["a"]}}}},
            {{"reward": {{"kind": "sum", "terms": [{{"weight": -0.5, "reward": {{"kind": "length", "target": 2}}}}]}}}},
            {{"weight": 0.25, "reward": {{"kind": "model", "path": {:?}, "normalize": false}}}}
        ]}}"#,
        rm_dir
    ));
    let got = alone(&sum, &tok, &x);
    let keywords = alone(&spec(r#"{"kind": "keywords", "keywords": ["a"]}"#), &tok, &x);
    let length = alone(&spec(r#"{"kind": "length", "target": 2}"#), &tok, &x);
    let learned = alone(&spec(&format!(r#"{{"kind": "model", "path": {rm_dir:?}, "normalize": false}}"#)), &tok, &x);
    let text_ids = [bytes.encode("the ").unwrap(), bytes.encode("a cat").unwrap(), vec![0]].concat();
    assert_eq!(learned, rm.score_ids(&[text_ids]).unwrap()[0], "the model inside reads the text in its tokens");
    assert!((got - (2.0 * keywords - 0.5 * length + 0.25 * learned)).abs() < 1e-5, "{got}");
    assert!(keywords > 0.0 && length != 0.0);
}

/// An ensemble's score is its combination of the members' scores alone — a reward model with
/// its own tokenizer among them — for each `combine`.
#[test]
fn an_ensemble_combines_the_members_scores_each_as_it_would_alone() {
    let d = tempfile::tempdir().unwrap();
    let (tok, rm_dir, _, _, x) = setup(d.path());
    let members = format!(
        r#"[{{"kind": "keywords", "keywords": ["a"], "weight": 3.0}}, {{"kind": "length", "target": 2}},
            {{"kind": "model", "path": {rm_dir:?}, "normalize": false}}]"#
    );
    let scores: Vec<f32> =
        serde_json::from_str::<Vec<RewardSpec>>(&members).unwrap().iter().map(|m| alone(m, &tok, &x)).collect();
    assert!(scores[0] != scores[1] && scores[1] != scores[2], "members that disagree: {scores:?}");
    for (combine, c) in [
        (r#"{"kind": "mean"}"#, Combine::Mean),
        (r#"{"kind": "min"}"#, Combine::Min),
        (r#"{"kind": "uwo", "lambda": 0.5}"#, Combine::Uwo { lambda: 0.5 }),
    ] {
        let ensemble = spec(&format!(r#"{{"kind": "ensemble", "members": {members}, "combine": {combine}}}"#));
        assert_eq!(alone(&ensemble, &tok, &x), c.apply(&scores), "{combine}");
    }
    let mean = scores.iter().sum::<f32>() / 3.0;
    assert_eq!(Combine::Min.apply(&scores), scores.iter().copied().fold(f32::INFINITY, f32::min));
    assert!(Combine::Uwo { lambda: 0.5 }.apply(&scores) < mean);
}

#[test]
fn a_sum_is_checked_as_its_terms_are() {
    let answer = spec(
        r#"{"kind": "sum", "terms": [{"reward": {"kind": "answer"}}, {"reward": {"kind": "length", "target": 9}}]}"#,
    );
    let e = check_reward_inputs(Some(&answer), None).unwrap_err().to_string();
    assert!(e.contains("reference_field"), "{e}");
    check_reward_inputs(Some(&answer), Some("answer")).unwrap();
    let Err(e) = build_reward(Some(&spec(r#"{"kind": "sum", "terms": []}"#)), &Cpu::default()) else {
        panic!("an empty sum")
    };
    assert!(e.to_string().contains("at least one term"), "{e}");
    assert!(serde_json::from_str::<RewardSpec>(
        r#"{"kind": "sum", "terms": [{"w": 1, "reward": {"kind": "length", "target": 1}}]}"#
    )
    .is_err());
}

#[test]
fn an_ensemble_is_checked_as_its_members_are() {
    let answer = spec(
        r#"{"kind": "ensemble", "combine": {"kind": "min"},
            "members": [{"kind": "answer"}, {"kind": "length", "target": 9}]}"#,
    );
    let e = check_reward_inputs(Some(&answer), None).unwrap_err().to_string();
    assert!(e.contains("reference_field"), "{e}");
    let Err(e) = build_reward(
        Some(&spec(r#"{"kind": "ensemble", "members": [], "combine": {"kind": "mean"}}"#)),
        &Cpu::default(),
    ) else {
        panic!("an empty ensemble")
    };
    assert!(e.to_string().contains("at least one member"), "{e}");
    let negative = spec(
        r#"{"kind": "ensemble", "combine": {"kind": "uwo", "lambda": -1}, "members": [{"kind": "length", "target": 9}]}"#,
    );
    let tok = Tokenizer::byte_level().unwrap();
    let Err(e) = build_reward(Some(&negative), &Cpu::default()).unwrap().for_policy(&tok, &[0]) else {
        panic!("a negative λ")
    };
    assert!(e.to_string().contains("combine.lambda"), "{e}");
    for bad in
        [r#"{"kind": "ensemble", "members": []}"#, r#"{"kind": "ensemble", "members": [], "combine": {"kind": "max"}}"#]
    {
        assert!(serde_json::from_str::<RewardSpec>(bad).is_err(), "{bad}");
    }
}
