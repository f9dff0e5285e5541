//! `{"kind": "sum", "terms": [...]}`: a weighted sum of any rewards of the config — rules,
//! reward models (each fitted to the policy's tokenizer on its own), nested sums — checked as
//! its terms are (a nested `answer` still needs `reference_field`).

mod common;

use common::pretrained_policy;
use dfdx::prelude::*;
use rlhf::stages::reward_spec::{build_reward, check_reward_inputs, RewardSpec};
use rlhf_envs::RewardInput;
use rlhf_policies::{checkpoint::load_with_tokenizer, CausalLm, LearnedReward, ModelConfig, ScalarHead, Tokenizer};

fn spec(json: &str) -> RewardSpec {
    serde_json::from_str(json).unwrap()
}

#[test]
fn a_sum_scores_the_weighted_terms_each_as_it_would_alone() {
    let d = tempfile::tempdir().unwrap();
    let (policy_dir, _) = pretrained_policy(d.path());
    let (_, tok) = load_with_tokenizer(&policy_dir, &Cpu::default()).unwrap();
    // a reward model with its own (byte-level) tokenizer inside the sum
    let bytes = Tokenizer::byte_level().unwrap();
    let rm_dir = d.path().join("rm");
    let dev = Cpu::default();
    let model = CausalLm::new(ModelConfig::gpt2_preset(258, 16, 1, 2, 64), &dev, 3).unwrap();
    let rm = LearnedReward { model, head: ScalarHead::new(&dev, 16, 0.5, 4), norm: None, pad_id: 0 };
    rm.save_pretrained(&rm_dir, Some(&bytes), None).unwrap();
    let sum = spec(&format!(
        r#"{{"kind": "sum", "terms": [
            {{"weight": 2.0, "reward": {{"kind": "keywords", "keywords": ["a"]}}}},
            {{"reward": {{"kind": "sum", "terms": [{{"weight": -0.5, "reward": {{"kind": "length", "target": 2}}}}]}}}},
            {{"weight": 0.25, "reward": {{"kind": "model", "path": {:?}, "normalize": false}}}}
        ]}}"#,
        rm_dir
    ));
    let cat = tok.encode("a cat").unwrap();
    let x = RewardInput {
        prompt: "the ".into(),
        response: "a cat".into(),
        prompt_ids: tok.encode("the ").unwrap(),
        response_ids: [cat.clone(), vec![0]].concat(),
        reference: None,
    };
    let mut reward = build_reward(Some(&sum), &dev).unwrap().for_policy(&tok, &[0]).unwrap();
    let got = reward.score(std::slice::from_ref(&x)).unwrap()[0];
    let alone = |s: &RewardSpec| {
        build_reward(Some(s), &dev).unwrap().for_policy(&tok, &[0]).unwrap().score(std::slice::from_ref(&x)).unwrap()[0]
    };
    let keywords = alone(&spec(r#"{"kind": "keywords", "keywords": ["a"]}"#));
    let length = alone(&spec(r#"{"kind": "length", "target": 2}"#));
    let learned = alone(&spec(&format!(r#"{{"kind": "model", "path": {rm_dir:?}, "normalize": false}}"#)));
    let text_ids = [bytes.encode("the ").unwrap(), bytes.encode("a cat").unwrap(), vec![0]].concat();
    assert_eq!(learned, rm.score_ids(&[text_ids]).unwrap()[0], "the model inside reads the text in its tokens");
    assert!((got - (2.0 * keywords - 0.5 * length + 0.25 * learned)).abs() < 1e-5, "{got}");
    assert!(keywords > 0.0 && length != 0.0);
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
