//! Admission control between intake and launch: a global concurrency cap (how many messages
//! this controller holds at once, which also bounds prefetch) and a governor token bucket
//! on launches, so a fan-out storm never hits the launcher faster than it can take.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    /// Messages held at once (received and not yet settled).
    pub max_concurrent: usize,
    /// Launches per second; `None`: unlimited.
    pub launch_rate: Option<NonZeroU32>,
    /// Launches allowed back to back before the rate applies.
    pub launch_burst: NonZeroU32,
}

pub struct Admission {
    capacity: Arc<Semaphore>,
    max_concurrent: usize,
    config: AdmissionConfig,
    launches: Option<DefaultDirectRateLimiter>,
}

/// A read-only handle on the admission state, for the dashboard.
#[derive(Clone)]
pub struct AdmissionView {
    capacity: Arc<Semaphore>,
    config: AdmissionConfig,
}

/// What the dashboard shows about admission.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdmissionState {
    /// Messages held now.
    pub in_use: usize,
    pub max_concurrent: usize,
    /// Launches per second; `None`: unlimited.
    pub launch_rate: Option<u32>,
    pub launch_burst: u32,
}

impl AdmissionView {
    pub fn state(&self) -> AdmissionState {
        AdmissionState {
            in_use: self.config.max_concurrent - self.capacity.available_permits(),
            max_concurrent: self.config.max_concurrent,
            launch_rate: self.config.launch_rate.map(NonZeroU32::get),
            launch_burst: self.config.launch_burst.get(),
        }
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            capacity: Arc::new(Semaphore::new(config.max_concurrent)),
            max_concurrent: config.max_concurrent,
            config,
            launches: config.launch_rate.map(|rate| {
                RateLimiter::direct(Quota::per_second(rate).allow_burst(config.launch_burst))
            }),
        }
    }

    /// Waits for room for one more message.
    pub async fn reserve(&self) -> OwnedSemaphorePermit {
        self.capacity
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Room for another message right now, if any.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.capacity.clone().try_acquire_owned().ok()
    }

    /// Waits until the launch rate allows one more launch.
    pub async fn until_launch_allowed(&self) {
        if let Some(limiter) = &self.launches {
            limiter.until_ready().await;
        }
    }

    /// Messages held now.
    pub fn in_use(&self) -> usize {
        self.max_concurrent - self.capacity.available_permits()
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    pub fn view(&self) -> AdmissionView {
        AdmissionView {
            capacity: self.capacity.clone(),
            config: self.config,
        }
    }
}
