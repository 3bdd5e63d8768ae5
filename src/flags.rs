//! What every component's command-line flags share: value parsers and the validation error.
//! A leaf module, so that each component can own its clap `Args` and the CLI (`config`)
//! can gather them without a cycle.

use std::time::Duration;

/// A flag whose value clap accepted but the controller cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

pub(crate) fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        message: message.into(),
    }
}

/// Parses a number of seconds, e.g. `30` or `2.5`.
pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} must be a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}
