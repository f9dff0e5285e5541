//! `rlhf`: the trainer crate — stages, configs, run folders and the `rlhf` CLI, built on
//! [`rlhf_policies`] (models) and [`rlhf_envs`] (environments).
#![warn(missing_docs)]

pub mod bench;
pub mod bench_env;
pub mod bench_grpo;
pub mod bench_ppo;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod eval;
pub mod generate;
pub mod malloc;
pub mod math;
pub mod preference;
pub mod progress;
pub mod prompt_format;
pub mod report;
pub mod run;
pub mod schedule;
pub mod stages;
pub mod stop;
