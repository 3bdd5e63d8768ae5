//! How one delivery of a step attempt ends on this controller, as a type.
//!
//! The step's life ([`crate::controller`]) produces exactly one [`Outcome`] per claimed
//! message; everything downstream reads it instead of matching strings: settle derives what
//! happens to the message ([`Outcome::disposition`]) and the step's final state, the taskiq
//! layer decides whether the attempt has a result to write, the metrics and the steps table
//! take its stable [`Outcome::name`].

use std::time::Duration;

use crate::state::StepState;

/// What the attempt's own terminal event in Dagster's event log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Succeeded,
    Failed,
    UpForRetry,
}

impl Finish {
    /// From the terminal event type the bridge reports (`STEP_SUCCESS`, ...).
    pub(crate) fn from_event(event_type: Option<&str>) -> Finish {
        match event_type {
            Some("STEP_SUCCESS") => Finish::Succeeded,
            Some("STEP_UP_FOR_RETRY") => Finish::UpForRetry,
            _ => Finish::Failed,
        }
    }
}

/// Why a message was acknowledged without running its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// The attempt already has its terminal event (an earlier delivery ran it).
    AlreadyFinished,
    /// The run is over (canceled, canceling, failed or succeeded): Dagster has our verdict.
    RunEnded,
    /// Another controller holds the attempt's claim and a live lease on its own message:
    /// this copy is a duplicate (docs/guarantees.md, "Claims").
    HeldElsewhere,
}

/// Why a message is given back to the queue, visible again after a delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The controller is draining before the step was launched.
    Shutdown,
    /// A continuation that its owner may still adopt: passed on.
    ContinuationNotOurs,
    /// Its run ended while the message waited for a slot; the next delivery skips it.
    StoppedWhileWaiting,
    /// It waited past `--waiting-limit` and could not be requeued as a copy.
    WaitedTooLong,
    /// A second delivery of an attempt this controller is settling right now.
    Duplicate,
    /// The queue returned more messages than were asked for.
    Overflow,
    /// Launching failed in a way that may pass (throttling, EAGAIN).
    LaunchTransient,
    /// Launching failed with this launcher's configuration.
    LaunchFailed,
    /// The execution failed before the step could start (an ECS task that never ran).
    NeverStarted,
    /// Dagster (the bridge) could not answer.
    BridgeUnavailable,
    /// The taskiq result could not be written yet.
    ResultUnwritten,
    /// The extended (S3) payload cannot be read yet.
    PayloadUnavailable,
}

impl Release {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Release::Shutdown => "shutdown",
            Release::ContinuationNotOurs => "continuation_not_ours",
            Release::StoppedWhileWaiting => "stopped_while_waiting",
            Release::WaitedTooLong => "waited_too_long",
            Release::Duplicate => "duplicate",
            Release::Overflow => "overflow",
            Release::LaunchTransient => "launch_transient",
            Release::LaunchFailed => "launch_failed",
            Release::NeverStarted => "never_started",
            Release::BridgeUnavailable => "bridge_unavailable",
            Release::ResultUnwritten => "result_unwritten",
            Release::PayloadUnavailable => "payload_unavailable",
        }
    }

    /// A failure that is retried after a backoff (state `backoff`), rather than a message
    /// handed back for someone else to run now (state `released`).
    fn is_backoff(self) -> bool {
        matches!(
            self,
            Release::LaunchTransient
                | Release::LaunchFailed
                | Release::NeverStarted
                | Release::BridgeUnavailable
                | Release::ResultUnwritten
                | Release::PayloadUnavailable
        )
    }
}

/// Why a message goes to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterReason {
    /// The message can never run (envelope validation); the poison's stable name.
    Poison(&'static str),
    /// Its launch settings can never work (bad `ecs/*` tags, ...); the launcher's reason.
    InvalidLaunch(&'static str),
    /// Its run does not exist in the Dagster instance.
    UnknownRun,
    /// Its op tags or launch labels are not the ones its run stored for the step.
    TagsMismatch,
    /// Dagster refused the request outright.
    BridgeRejected,
    /// Delivered `--max-attempts` times without reaching an outcome.
    AttemptsExhausted,
    /// Its extended payload stayed unreadable for `--max-attempts` deliveries.
    PayloadUnavailable,
}

impl DeadLetterReason {
    /// The stable reason: the `dagster_taskiq_error` attribute and the metric label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            DeadLetterReason::Poison(name) | DeadLetterReason::InvalidLaunch(name) => name,
            DeadLetterReason::UnknownRun => "unknown_run",
            DeadLetterReason::TagsMismatch => "tags_mismatch",
            DeadLetterReason::BridgeRejected => "bridge_rejected",
            DeadLetterReason::AttemptsExhausted => "attempts_exhausted",
            DeadLetterReason::PayloadUnavailable => "payload_unavailable",
        }
    }

    /// `poison` (redriving it changes nothing) or `transient` (it may run once the cause
    /// is fixed): the `dagster_taskiq_error_class` attribute.
    pub(crate) fn error_class(self) -> &'static str {
        match self {
            DeadLetterReason::AttemptsExhausted | DeadLetterReason::PayloadUnavailable => {
                "transient"
            }
            _ => "poison",
        }
    }
}

/// How one delivery of a step attempt ended here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The attempt's own terminal event is in Dagster's event log.
    Finished(Finish),
    /// The execution ended without an outcome and Dagster has our verdict (the executor
    /// fails the step; its RetryPolicy decides).
    Verdict { cause: String, timed_out: bool },
    /// Acknowledged without running.
    Skipped(Skip),
    /// It ran, but its run ended meanwhile and Dagster recorded no outcome for it.
    RunEnded,
    /// It waited too long for a slot: a copy went back to the queue for other replicas.
    Requeued,
    /// Given back to the queue, visible again after `delay`.
    Released { why: Release, delay: Duration },
    /// Shutdown: an execution that survives the controller (an ECS task) is left running
    /// and its message given back at once for another replica to adopt.
    HandedOff,
    /// Shutdown grace over: the execution was killed and its message given back.
    Killed,
    /// The lease was lost: the message belongs to someone else now.
    Fenced,
    /// A hand-off whose continuation never came back (lost, deleted or purged): the
    /// execution was stopped and Dagster has our verdict; no message is ours to touch.
    ContinuationLost { cause: String },
    /// Sent to the dead-letter queue.
    DeadLettered {
        reason: DeadLetterReason,
        detail: String,
    },
}

/// What settling an [`Outcome`] does to the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition<'a> {
    /// The outcome is durable: delete the message.
    Delete,
    /// Make it visible again after this delay.
    Release(Duration),
    /// Send it to the dead-letter queue with the reason, then delete it.
    DeadLetter {
        reason: DeadLetterReason,
        detail: &'a str,
    },
    /// Touch nothing: another holder has it.
    Nothing,
}

impl Outcome {
    /// Released for shutdown: visible again at once.
    pub(crate) fn shutdown() -> Outcome {
        Outcome::Released {
            why: Release::Shutdown,
            delay: Duration::ZERO,
        }
    }

    pub(crate) fn dead_letter(reason: DeadLetterReason, detail: impl Into<String>) -> Outcome {
        Outcome::DeadLettered {
            reason,
            detail: detail.into(),
        }
    }

    /// The stable name: the steps table's `outcome`, the label of the message metrics.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Outcome::Finished(Finish::Succeeded) => "succeeded",
            Outcome::Finished(Finish::Failed) => "failed",
            Outcome::Finished(Finish::UpForRetry) => "up_for_retry",
            Outcome::Verdict {
                timed_out: true, ..
            } => "timed_out",
            Outcome::Verdict { .. } => "verdict",
            Outcome::Skipped(Skip::AlreadyFinished) => "already_finished",
            Outcome::Skipped(Skip::RunEnded) | Outcome::RunEnded => "run_ended",
            Outcome::Skipped(Skip::HeldElsewhere) => "held_elsewhere",
            Outcome::Requeued => "requeued",
            Outcome::Released { why, .. } => why.name(),
            Outcome::HandedOff => "handed_off",
            Outcome::Killed => "killed",
            Outcome::Fenced => "fenced",
            Outcome::ContinuationLost { .. } => "continuation_lost",
            Outcome::DeadLettered { reason, .. } => reason.name(),
        }
    }

    pub(crate) fn disposition(&self) -> Disposition<'_> {
        match self {
            Outcome::Finished(_)
            | Outcome::Verdict { .. }
            | Outcome::Skipped(_)
            | Outcome::RunEnded
            | Outcome::Requeued => Disposition::Delete,
            Outcome::Released { delay, .. } => Disposition::Release(*delay),
            Outcome::HandedOff | Outcome::Killed => Disposition::Release(Duration::ZERO),
            Outcome::DeadLettered { reason, detail } => Disposition::DeadLetter {
                reason: *reason,
                detail,
            },
            Outcome::Fenced | Outcome::ContinuationLost { .. } => Disposition::Nothing,
        }
    }

    /// The step's final state in the steps table.
    pub(crate) fn final_state(&self) -> StepState {
        match self {
            Outcome::Finished(_) | Outcome::Verdict { .. } | Outcome::RunEnded => StepState::Acked,
            Outcome::Skipped(_) => StepState::Skipped,
            Outcome::Requeued | Outcome::HandedOff | Outcome::Killed => StepState::Released,
            Outcome::Released { why, .. } if why.is_backoff() => StepState::Backoff,
            Outcome::Released { .. } => StepState::Released,
            Outcome::Fenced | Outcome::ContinuationLost { .. } => StepState::Fenced,
            Outcome::DeadLettered { .. } => StepState::DeadLettered,
        }
    }

    /// Whether the attempt ended for good from the run's point of view: the executor will
    /// not see this attempt run again, so a taskiq result is due (a duplicate's holder
    /// writes it).
    pub(crate) fn ends_attempt(&self) -> bool {
        matches!(
            self,
            Outcome::Finished(_)
                | Outcome::Verdict { .. }
                | Outcome::Skipped(Skip::AlreadyFinished | Skip::RunEnded)
                | Outcome::RunEnded
                | Outcome::ContinuationLost { .. }
                | Outcome::DeadLettered { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_fate_state_and_result() {
        use Disposition::{Delete, Nothing, Release as Back};
        let three = Duration::from_secs(3);
        // (outcome, what happens to the message, final state, taskiq result due)
        let table = [
            (
                Outcome::Finished(Finish::Succeeded),
                Delete,
                StepState::Acked,
                true,
            ),
            (
                Outcome::Verdict {
                    cause: "x".into(),
                    timed_out: false,
                },
                Delete,
                StepState::Acked,
                true,
            ),
            (
                Outcome::Skipped(Skip::AlreadyFinished),
                Delete,
                StepState::Skipped,
                true,
            ),
            (
                Outcome::Skipped(Skip::HeldElsewhere),
                Delete,
                StepState::Skipped,
                false,
            ),
            (Outcome::RunEnded, Delete, StepState::Acked, true),
            (Outcome::Requeued, Delete, StepState::Released, false),
            (
                Outcome::Released {
                    why: Release::NeverStarted,
                    delay: three,
                },
                Back(three),
                StepState::Backoff,
                false,
            ),
            (
                Outcome::shutdown(),
                Back(Duration::ZERO),
                StepState::Released,
                false,
            ),
            (
                Outcome::HandedOff,
                Back(Duration::ZERO),
                StepState::Released,
                false,
            ),
            (
                Outcome::Killed,
                Back(Duration::ZERO),
                StepState::Released,
                false,
            ),
            (Outcome::Fenced, Nothing, StepState::Fenced, false),
            (
                Outcome::ContinuationLost { cause: "x".into() },
                Nothing,
                StepState::Fenced,
                true,
            ),
        ];
        for (outcome, disposition, state, result) in &table {
            assert_eq!(outcome.disposition(), *disposition, "{outcome:?}");
            assert_eq!(outcome.final_state(), *state, "{outcome:?}");
            assert!(state.is_final(), "{outcome:?}");
            assert_eq!(outcome.ends_attempt(), *result, "{outcome:?}");
        }
        let dead = Outcome::dead_letter(DeadLetterReason::UnknownRun, "gone");
        assert_eq!(
            dead.disposition(),
            Disposition::DeadLetter {
                reason: DeadLetterReason::UnknownRun,
                detail: "gone"
            }
        );
        assert_eq!(dead.final_state(), StepState::DeadLettered);
        assert!(dead.ends_attempt());
    }

    #[test]
    fn names_are_the_documented_labels() {
        assert_eq!(
            Outcome::Finished(Finish::from_event(Some("STEP_SUCCESS"))).name(),
            "succeeded"
        );
        assert_eq!(Outcome::Finished(Finish::from_event(None)).name(), "failed");
        assert_eq!(
            Outcome::Verdict {
                cause: String::new(),
                timed_out: true
            }
            .name(),
            "timed_out"
        );
        assert_eq!(
            Outcome::dead_letter(DeadLetterReason::Poison("invalid_json"), "").name(),
            "invalid_json"
        );
        assert_eq!(
            DeadLetterReason::AttemptsExhausted.error_class(),
            "transient"
        );
        assert_eq!(
            DeadLetterReason::InvalidLaunch("invalid_launch_tags").error_class(),
            "poison"
        );
    }
}
