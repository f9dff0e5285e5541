//! The one error type of `rlhf-envs`.

/// Errors from environments, reward models and the models they call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvError {
    /// `step` on an episode that already ended (call `reset`).
    #[error("step called on a finished episode (row {row}); reset it first")]
    EpisodeDone {
        /// The env row.
        row: usize,
    },
    /// `step` before the first `reset`.
    #[error("step called before reset (row {row})")]
    NotReset {
        /// The env row.
        row: usize,
    },
    /// An action outside the action space.
    #[error("action {action} is outside the action space Discrete({n})")]
    InvalidAction {
        /// The action.
        action: u32,
        /// Vocabulary size.
        n: u32,
    },
    /// A batch call got the wrong number of inputs.
    #[error("expected {expected} {what}, got {got}")]
    Count {
        /// What was counted.
        what: &'static str,
        /// Expected count.
        expected: usize,
        /// Actual count.
        got: usize,
    },
    /// A reward model returned a NaN or infinite score.
    #[error("reward model {model}: score {index} is not finite ({value})")]
    NonFinite {
        /// Which reward model.
        model: String,
        /// Index in the batch.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A reward model failed.
    #[error("reward model {model}: {msg}")]
    Reward {
        /// Which reward model.
        model: String,
        /// What went wrong.
        msg: String,
    },
    /// The policy or reference model failed.
    #[error("model: {0}")]
    Model(String),
    /// Invalid configuration.
    #[error("config field `{field}`: {msg}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        msg: String,
    },
}

impl EnvError {
    /// A reward-model failure.
    pub fn reward(model: impl Into<String>, msg: impl Into<String>) -> Self {
        EnvError::Reward { model: model.into(), msg: msg.into() }
    }
}
