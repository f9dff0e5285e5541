//! The training stages, one module each, readable top to bottom.

pub mod common;
pub mod pretrain;
pub mod reward;
pub mod sft;
