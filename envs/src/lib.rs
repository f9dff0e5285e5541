//! `rlhf-envs`: the gym-like side of RLHF, with no autodiff dependency.
//!
//! A language model is a policy whose action space is the vocabulary ([`Discrete`]) and whose
//! observation is the token sequence so far ([`TokenSeq`]). The environment, reward-model
//! plug-ins and vectorised rollouts build on these spaces; models reach this crate only
//! through small traits, so it compiles and tests without dfdx.
#![deny(missing_docs)]

pub mod spaces;

pub use spaces::{Discrete, Space, TokenSeq};
