//! The training stages, one module each, readable top to bottom.

pub mod pretrain;
