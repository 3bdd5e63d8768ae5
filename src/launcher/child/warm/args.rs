//! The warm pool's flags.

use std::time::Duration;

use crate::flags::{invalid, parse_seconds, ConfigError};

/// The warm pool's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WarmArgs {
    /// Fork process steps from a warm zygote that has imported Dagster once, instead of
    /// starting a fresh interpreter per step. Falls back to cold starts while it is unhealthy.
    #[arg(long, env = "DAGSTER_TASKIQ_WARM_POOL")]
    pub warm_pool: bool,

    /// Module (or `.py` file) the zygote imports before forking, e.g. the code location's
    /// module; repeatable (env: comma-separated).
    #[arg(
        long = "warm-preload",
        env = "DAGSTER_TASKIQ_WARM_PRELOAD",
        value_name = "MODULE",
        value_delimiter = ','
    )]
    pub warm_preload: Vec<String>,

    /// Replace the zygote after this many forks (0: never).
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_WARM_RECYCLE_AFTER",
        default_value_t = 1000
    )]
    pub warm_recycle_after: u64,

    /// Replace the zygote when its resident memory grew by more than this many MiB since it
    /// was ready (0: never).
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_WARM_MAX_RSS_GROWTH_MB",
        default_value_t = 256
    )]
    pub warm_max_rss_growth_mb: u64,

    /// Seconds the zygote may take to import Dagster and the preload modules.
    #[arg(long, env = "DAGSTER_TASKIQ_WARM_START_TIMEOUT", default_value = "120", value_parser = parse_seconds)]
    pub warm_start_timeout: Duration,
}

impl WarmArgs {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.warm_start_timeout.is_zero() {
            return Err(invalid("warm-start-timeout", "must be more than 0"));
        }
        if let Some(bad) = self.warm_preload.iter().find(|m| m.trim().is_empty()) {
            return Err(invalid(
                "warm-preload",
                format!("{bad:?} is not a module name or file"),
            ));
        }
        Ok(())
    }
}
