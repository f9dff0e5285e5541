//! The training stages, one module each, readable top to bottom.

pub mod common;
pub mod dpo;
pub mod dpo_data;
pub mod grpo;
pub mod grpo_step;
pub mod kto;
pub mod lora_state;
pub mod nlpo;
pub mod online_dpo;
pub mod policy_eval;
pub mod ppo;
pub mod ppo_models;
pub mod ppo_step;
pub mod pretrain;
pub mod prompts;
pub mod reward;
pub mod reward_spec;
pub mod sft;
