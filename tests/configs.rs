//! The shipped `configs/*.json` load into their stages' config structs (unknown fields are
//! errors, so a renamed field would otherwise break them unnoticed), and an old-style
//! schedule with its own `lr` is refused by name.

use std::path::{Path, PathBuf};

use rlhf::config::load;
use rlhf::schedule::LrSchedule;
use rlhf::stages::{dpo::DpoConfig, grpo::GrpoConfig, ppo::PpoConfig, pretrain::PretrainConfig};
use rlhf::stages::{reward::RewardConfig, sft::SftConfig};

fn configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_loads_into_its_stage() {
    let files = configs();
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        let name = f.file_stem().unwrap().to_str().unwrap();
        // the name's first stage word; `online` (rlhf online-dpo) is the GRPO family's config
        let stages = ["pretrain", "sft", "reward", "online", "dpo", "ppo", "grpo"];
        let stage = name.split('_').find(|w| stages.contains(w)).unwrap_or(name);
        let schedule = match stage {
            "pretrain" => load::<PretrainConfig>(Some(f), &[]).map(|c| c.schedule),
            "sft" => load::<SftConfig>(Some(f), &[]).map(|c| c.schedule),
            "reward" => load::<RewardConfig>(Some(f), &[]).map(|c| c.schedule),
            "dpo" => load::<DpoConfig>(Some(f), &[]).map(|c| c.schedule),
            "ppo" => load::<PpoConfig>(Some(f), &[]).map(|c| c.schedule),
            "grpo" | "online" => load::<GrpoConfig>(Some(f), &[]).map(|c| c.schedule),
            other => panic!("{}: no stage named {other:?}", f.display()),
        };
        schedule.unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_peak_rate_is_optim_lr_and_the_decay_ends_at_the_last_step() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hh_rlhf_sft.json");
    let sets = ["optim.lr=1e-3".to_string(), "steps=1000".to_string()];
    let c: SftConfig = load(Some(&f), &sets).unwrap();
    let lr = |step| c.schedule.at(c.optim.lr, c.steps, step);
    assert_eq!(lr(19), 1e-3, "the end of the warm-up is the overridden peak");
    assert!(lr(999) > 3e-5 && lr(999) < 3.001e-5, "still decaying at step 999: {}", lr(999));
    assert_eq!(lr(1000), 3e-5);
}

#[test]
fn a_schedule_with_its_own_rate_is_an_error_naming_the_field() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("old.json");
    std::fs::write(&f, r#"{"schedule": {"kind": "constant", "lr": 1e-5}}"#).unwrap();
    let e = load::<DpoConfig>(Some(&f), &[]).unwrap_err().to_string();
    assert!(e.contains("old.json") && e.contains("schedule") && e.contains("unknown field `lr`"), "{e}");
    assert!(e.contains("the peak learning rate is `optim.lr`"), "{e}");
    assert_eq!(load::<DpoConfig>(None, &[]).unwrap().schedule, LrSchedule::constant());
}

#[test]
fn a_field_beside_a_variant_that_takes_none_is_an_error_not_ignored() {
    // serde lets a unit variant of an internally tagged enum drop unknown fields silently: a
    // `label_smoothing` beside `sigmoid` would train plain DPO. Every such variant refuses them.
    let refused = |r: Result<(), serde_json::Error>, what: &str| {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{what}: {e}");
    };
    use rlhf::math::dpo::DpoLoss;
    use rlhf::math::ppo::KlControl;
    use rlhf::stages::{ppo_models::ValueModelConfig, pretrain::TokenizerSpec, reward::NormReference};
    let json = |s: &str| -> serde_json::Value { serde_json::from_str(s).unwrap() };
    refused(
        serde_json::from_value::<DpoLoss>(json(r#"{"kind": "sigmoid", "label_smoothing": 0.1}"#)).map(drop),
        "sigmoid",
    );
    refused(serde_json::from_value::<DpoLoss>(json(r#"{"kind": "hinge", "tau": 0.1}"#)).map(drop), "hinge");
    refused(serde_json::from_value::<KlControl>(json(r#"{"kind": "fixed", "target": 6}"#)).map(drop), "fixed");
    refused(serde_json::from_value::<ValueModelConfig>(json(r#"{"kind": "shared", "init": "x"}"#)).map(drop), "shared");
    refused(serde_json::from_value::<TokenizerSpec>(json(r#"{"kind": "char", "vocab_size": 9}"#)).map(drop), "char");
    refused(serde_json::from_value::<NormReference>(json(r#"{"kind": "eval_responses", "x": 1}"#)).map(drop), "eval");
    refused(serde_json::from_value::<LrSchedule>(json(r#"{"kind": "constant", "lr": 1}"#)).map(drop), "constant");
    // and they still read without fields, as before
    assert_eq!(serde_json::from_value::<DpoLoss>(json(r#"{"kind": "sigmoid"}"#)).unwrap(), DpoLoss::Sigmoid {});
    assert_eq!(serde_json::to_value(ValueModelConfig::Shared {}).unwrap(), json(r#"{"kind": "shared"}"#));
}
