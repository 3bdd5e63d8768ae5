//! The step-state checks of the messages of one receive, asked of the bridge in one request
//! ([`DagsterBridge::step_states`]) instead of one round trip each.
//!
//! Each message's task holds a [`CheckTicket`] of its receive. Its first step-state check
//! joins the receive's batch; the batch goes out when every ticket of the receive has joined
//! or was dropped (its message ended before reconciling: poison, duplicate, ...), or when
//! [`GATHER_WINDOW`] has passed since the first one joined (a message still fetching its
//! payload, or waiting for a running copy of its attempt, does not hold the others). A check
//! that comes after its batch went out is asked alone. Each message gets its own answer or
//! error, and handles it as before (`calls::ask_bridge` retries alone).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::dagster::{BridgeError, DagsterBridge, StepState};
use crate::envelope::StepRequest;

/// Longest a check waits for the other messages of its receive to join it.
pub(super) const GATHER_WINDOW: Duration = Duration::from_millis(20);

type Answer = Result<StepState, BridgeError>;

/// The checks of one receive.
struct ReceiveChecks {
    gather: Mutex<Gather>,
    /// Something joined or withdrew: a waiting check looks whether the batch is complete.
    changed: Notify,
    tickets: usize,
}

#[derive(Default)]
struct Gather {
    asked: Vec<(StepRequest, oneshot::Sender<Answer>)>,
    withdrawn: usize,
    sent: bool,
}

/// A message's place in the step-state batch of its receive.
pub(super) struct CheckTicket {
    checks: Option<Arc<ReceiveChecks>>,
}

impl CheckTicket {
    /// One ticket per message of a receive. A single message needs no batch.
    pub(super) fn for_receive(messages: usize) -> Vec<CheckTicket> {
        if messages < 2 {
            return (0..messages).map(|_| CheckTicket::alone()).collect();
        }
        let checks = Arc::new(ReceiveChecks {
            gather: Mutex::new(Gather::default()),
            changed: Notify::new(),
            tickets: messages,
        });
        (0..messages)
            .map(|_| CheckTicket {
                checks: Some(checks.clone()),
            })
            .collect()
    }

    /// A ticket that asks alone.
    pub(super) fn alone() -> CheckTicket {
        CheckTicket { checks: None }
    }

    /// The step's state, asked with the other checks of the receive (a ticket is used once;
    /// a retry asks with [`CheckTicket::alone`]).
    pub(super) async fn step_state(
        mut self,
        bridge: &dyn DagsterBridge,
        step: &StepRequest,
    ) -> Answer {
        match self.checks.take() {
            Some(checks) => checks.ask(bridge, step).await,
            None => bridge.step_state(step).await,
        }
    }
}

impl Drop for CheckTicket {
    fn drop(&mut self) {
        if let Some(checks) = self.checks.take() {
            checks.gather.lock().withdrawn += 1;
            checks.changed.notify_waiters();
        }
    }
}

impl ReceiveChecks {
    async fn ask(&self, bridge: &dyn DagsterBridge, step: &StepRequest) -> Answer {
        let (tx, mut rx) = oneshot::channel();
        let late = {
            let mut gather = self.gather.lock();
            if !gather.sent {
                gather.asked.push((step.clone(), tx));
            }
            gather.sent
        };
        if late {
            return bridge.step_state(step).await;
        }
        self.changed.notify_waiters();
        let deadline = Instant::now() + GATHER_WINDOW;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(batch) = self.take_when_due(deadline) {
                send(bridge, batch).await;
            }
            tokio::select! {
                answer = &mut rx => {
                    return answer.unwrap_or_else(|_| {
                        Err(BridgeError::Unavailable(
                            "the batched step-state check was dropped".into(),
                        ))
                    });
                }
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// The batch, for the caller to send, once every ticket joined or withdrew, or at
    /// `deadline`; `None` while neither, or when it went out already.
    fn take_when_due(
        &self,
        deadline: Instant,
    ) -> Option<Vec<(StepRequest, oneshot::Sender<Answer>)>> {
        let mut gather = self.gather.lock();
        let complete = gather.asked.len() + gather.withdrawn >= self.tickets;
        if gather.sent || !(complete || Instant::now() >= deadline) {
            return None;
        }
        gather.sent = true;
        Some(std::mem::take(&mut gather.asked))
    }
}

/// Asks the bridge for the whole batch and hands each check its answer.
async fn send(bridge: &dyn DagsterBridge, batch: Vec<(StepRequest, oneshot::Sender<Answer>)>) {
    let (steps, waiters): (Vec<StepRequest>, Vec<oneshot::Sender<Answer>>) =
        batch.into_iter().unzip();
    match bridge.step_states(&steps).await {
        Ok(answers) => {
            for (waiter, answer) in waiters.into_iter().zip(answers) {
                let _ = waiter.send(answer);
            }
        }
        Err(e) => {
            for waiter in waiters {
                let _ = waiter.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::FakeBridge;

    fn step(key: &str) -> StepRequest {
        let body = crate::fakes::step_body(&format!("task-{key}"), "run-1", key, 0);
        crate::envelope::decode(&body).expect("valid body")
    }

    #[tokio::test(start_paused = true)]
    async fn the_checks_of_one_receive_go_in_one_request_and_a_bad_entry_fails_alone() {
        let bridge = FakeBridge::default();
        bridge.fail_step_state("broken");
        let mut tickets = CheckTicket::for_receive(4);
        let a = tickets.pop().unwrap();
        let b = tickets.pop().unwrap();
        let c = tickets.pop().unwrap();
        // The fourth message ended before reconciling: it withdraws by being dropped.
        drop(tickets);
        let (sa, sb, sc) = (step("a"), step("broken"), step("c"));
        let started = Instant::now();
        let (ra, rb, rc) = tokio::join!(
            a.step_state(&bridge, &sa),
            b.step_state(&bridge, &sb),
            c.step_state(&bridge, &sc),
        );
        assert_eq!(bridge.step_state_batches(), vec![3]);
        assert!(ra.is_ok() && rc.is_ok());
        assert!(matches!(rb, Err(BridgeError::Internal(_))));
        assert!(started.elapsed() < GATHER_WINDOW, "no wait once all joined");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_never_asks_holds_the_others_no_longer_than_the_window() {
        let bridge = FakeBridge::default();
        let mut tickets = CheckTicket::for_receive(3);
        let slow = tickets.pop().unwrap();
        let a = tickets.pop().unwrap();
        let b = tickets.pop().unwrap();
        let (sa, sb) = (step("a"), step("b"));
        let started = Instant::now();
        let (ra, rb) = tokio::join!(a.step_state(&bridge, &sa), b.step_state(&bridge, &sb));
        assert!(ra.is_ok() && rb.is_ok());
        assert_eq!(started.elapsed(), GATHER_WINDOW);
        assert_eq!(bridge.step_state_batches(), vec![2]);
        // The late one asks alone.
        let late = step("slow");
        slow.step_state(&bridge, &late).await.unwrap();
        assert_eq!(bridge.step_state_batches(), vec![2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_fails_each_check_with_its_error() {
        let bridge = FakeBridge::default();
        bridge.set_down(true);
        let mut tickets = CheckTicket::for_receive(2);
        let a = tickets.pop().unwrap();
        let b = tickets.pop().unwrap();
        let (sa, sb) = (step("a"), step("b"));
        let (ra, rb) = tokio::join!(a.step_state(&bridge, &sa), b.step_state(&bridge, &sb));
        assert!(matches!(ra, Err(BridgeError::Unavailable(_))));
        assert!(matches!(rb, Err(BridgeError::Unavailable(_))));
    }
}
