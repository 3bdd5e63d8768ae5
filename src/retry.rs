//! The backoff policy, and `retry`, the one retry loop for calls across a boundary: it
//! retries a call while its error is `Transient`, with [`Backoff`] pauses, within a
//! `RetryBudget`. What a failure means for a message is decided in one place, the
//! controller's error policy (`controller::settle::error_policy`).

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Exponential backoff with full jitter: attempt `n` (from 1) waits a uniformly random time
/// in `[0, min(cap, base * 2^(n-1))]`. Full jitter spreads a herd of retries evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The upper bound of the delay before retry number `attempt` (1-based).
    pub(crate) fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << exponent.min(31))
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// A jittered delay before retry number `attempt` (1-based).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }
}

/// Errors that may pass if the same call is made again.
pub(crate) trait Transient {
    fn is_transient(&self) -> bool;
}

/// How much retrying a call gets: pauses drawn from `backoff`, no retry whose pause would end
/// more than `time` after the first call began, at most `tries` calls in all (`None`: no limit
/// of that kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryBudget {
    pub backoff: Backoff,
    pub time: Option<Duration>,
    pub tries: Option<u32>,
}

impl RetryBudget {
    /// Retries for up to `time`.
    pub(crate) const fn within(backoff: Backoff, time: Duration) -> Self {
        Self {
            backoff,
            time: Some(time),
            tries: None,
        }
    }

    /// At most `tries` calls.
    pub(crate) const fn tries(backoff: Backoff, tries: u32) -> Self {
        Self {
            backoff,
            time: None,
            tries: Some(tries),
        }
    }
}

/// The shortest pause between two calls, whatever the jitter draws: a zero pause would
/// retry a failing service in a tight loop.
pub(crate) const MIN_PAUSE: Duration = Duration::from_millis(50);

/// Calls `call` until it succeeds, fails with an error that is not transient, or the budget
/// is spent; returns the last result. `on_retry(error, attempt, pause)` runs before each
/// pause (to log or count the failure that is being retried).
pub(crate) async fn retry<T, E, F, Fut>(
    budget: RetryBudget,
    mut call: F,
    mut on_retry: impl FnMut(&E, u32, Duration),
) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = budget.time.map(|time| Instant::now() + time);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let error = match call().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let pause = budget.backoff.delay(attempt).max(MIN_PAUSE);
        let out_of_tries = budget.tries.is_some_and(|tries| attempt >= tries);
        let out_of_time = deadline.is_some_and(|deadline| Instant::now() + pause > deadline);
        if !error.is_transient() || out_of_tries || out_of_time {
            return Err(error);
        }
        on_retry(&error, attempt, pause);
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(60),
        };
        let ceilings: Vec<u64> = (1..=7).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, vec![2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(1000), Duration::from_secs(60));
    }

    #[test]
    fn delay_stays_within_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        for attempt in 1..20 {
            for _ in 0..50 {
                assert!(b.delay(attempt) <= b.ceiling(attempt));
            }
        }
    }

    #[derive(Debug, PartialEq)]
    struct Failure(bool);

    impl Transient for Failure {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    const QUICK: Backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(1),
    };

    /// Fails transiently `failures` times, then succeeds; counts the calls.
    async fn flaky(calls: &AtomicU32, failures: u32) -> Result<u32, Failure> {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= failures {
            Err(Failure(true))
        } else {
            Ok(n)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let mut retried = Vec::new();
        let result = retry(
            RetryBudget::within(QUICK, Duration::from_secs(60)),
            || flaky(&calls, 3),
            |_, attempt, pause| {
                assert!(pause >= MIN_PAUSE);
                retried.push(attempt);
            },
        )
        .await;
        assert_eq!(result, Ok(4));
        assert_eq!(retried, vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_is_returned_at_once() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            RetryBudget::tries(QUICK, 5),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Failure(false))
            },
            |_, _, _| {},
        )
        .await;
        assert_eq!(result, Err(Failure(false)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_tries_and_time() {
        let calls = AtomicU32::new(0);
        let result = retry(
            RetryBudget::tries(QUICK, 3),
            || flaky(&calls, 100),
            |_, _, _| {},
        )
        .await;
        assert_eq!(result, Err(Failure(true)));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let budget = Duration::from_secs(2);
        let result = retry(
            RetryBudget::within(QUICK, budget),
            || flaky(&calls, u32::MAX),
            |_, _, _| {},
        )
        .await;
        assert_eq!(result, Err(Failure(true)));
        assert!(started.elapsed() <= budget, "{:?}", started.elapsed());
        assert!(calls.load(Ordering::SeqCst) > 1);
    }
}
