//! A step process's two pipes as they are read, for both local launchers: stdout lines to the
//! step's tracing span (or, when collected, to its serialized events), stderr lines to the
//! span and a bounded tail that a verdict quotes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncRead;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::events::{self, EventLines, EventSink};
use super::limits;
use crate::bounded_lines::{BoundedLines, LongLines, MAX_LINE_BYTES};
use crate::envelope::StepRequest;

/// How many stderr lines a verdict quotes (each at most [`MAX_LINE_BYTES`] and a marker).
const STDERR_TAIL_LINES: usize = 20;
/// How long to wait for output pipes to close after the process exited (a grandchild may
/// still hold them).
const PIPE_DRAIN: Duration = Duration::from_secs(2);

/// What a step's stderr told so far: its last lines, and whether any line named a failed
/// allocation (the address-space limit's out-of-memory sign, which may scroll out of the tail).
#[derive(Default)]
struct StderrSeen {
    tail: VecDeque<String>,
    allocation_failed: bool,
}

/// Shared between the stderr reader and the step.
type Tail = Arc<Mutex<StderrSeen>>;

fn new_tail() -> Tail {
    Arc::new(Mutex::new(StderrSeen {
        tail: VecDeque::with_capacity(STDERR_TAIL_LINES),
        allocation_failed: false,
    }))
}

fn tail_lines(tail: &Tail) -> Vec<String> {
    tail.lock().tail.iter().cloned().collect()
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Where a step's serialized event lines go: the sink, when the step prints them
/// (`print_serialized_events`) and they are collected.
fn event_lines_of(step: &StepRequest, sink: &Option<EventSink>) -> Option<EventSink> {
    sink.clone().filter(|_| step.print_serialized_events)
}

/// Streams a pipe's lines into the step's span, each at most [`MAX_LINE_BYTES`] (then cut,
/// with a marker). With `events`, stdout lines that are serialized Dagster events go there
/// instead; they may be as long as the events' whole budget ([`events::MAX_EVENT_BYTES`]).
async fn forward_lines(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    tail: Option<Tail>,
    events: Option<EventSink>,
) {
    let mut lines = match events {
        Some(_) => BoundedLines::with_long_lines(
            pipe,
            MAX_LINE_BYTES,
            LongLines {
                limit: events::MAX_EVENT_BYTES,
                long: events::starts_like_an_event,
            },
        ),
        None => BoundedLines::new(pipe, MAX_LINE_BYTES),
    };
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(events) = &events {
            if line.truncated > 0 && events::starts_like_an_event(line.text.as_bytes()) {
                // Cut, it is no event any more: the result must not pretend to be complete.
                events.lock().drop_line();
                tracing::warn!(
                    target: "step::stdout",
                    limit = events::MAX_EVENT_BYTES,
                    bytes = line.text.len() + line.truncated,
                    "event line dropped: it is over the limit"
                );
                continue;
            }
            if events::is_serialized_event(&line.text) {
                let kept = events.lock().push(line.text);
                if !kept {
                    tracing::warn!(
                        target: "step::stdout",
                        limit = events::MAX_EVENT_BYTES,
                        "event line dropped: the step's events are over the limit"
                    );
                }
                continue;
            }
        }
        // A long line that turned out not to be an event is cut like any other.
        let line = line.cut_to(MAX_LINE_BYTES).marked();
        match stream {
            // With print_serialized_events the step prints one serialized event per line.
            Stream::Stdout => tracing::debug!(target: "step::stdout", "{line}"),
            Stream::Stderr => tracing::info!(target: "step::stderr", "{line}"),
        }
        if let Some(tail) = &tail {
            let mut seen = tail.lock();
            seen.allocation_failed |= limits::names_an_allocation_failure(&line);
            if seen.tail.len() == STDERR_TAIL_LINES {
                seen.tail.pop_front();
            }
            seen.tail.push_back(line);
        }
    }
}

/// A step process's two pipes as they are read: stdout lines to the step's span (or, when
/// collected, to its serialized events), stderr lines to the span and a bounded tail.
pub(super) struct StepOutput {
    readers: Vec<JoinHandle<()>>,
    stderr_tail: Tail,
    events: Option<EventSink>,
}

impl StepOutput {
    /// Starts reading at once, so a chatty child never blocks on a full pipe.
    pub(super) fn forward(
        stdout: impl AsyncRead + Unpin + Send + 'static,
        stderr: impl AsyncRead + Unpin + Send + 'static,
        step: &StepRequest,
    ) -> Self {
        let stderr_tail = new_tail();
        let events = EventLines::sink_for(step);
        let span = tracing::Span::current();
        let readers = vec![
            tokio::spawn(
                forward_lines(stdout, Stream::Stdout, None, event_lines_of(step, &events))
                    .instrument(span.clone()),
            ),
            tokio::spawn(
                forward_lines(stderr, Stream::Stderr, Some(stderr_tail.clone()), None)
                    .instrument(span),
            ),
        ];
        Self {
            readers,
            stderr_tail,
            events,
        }
    }

    /// After the exit: lets the readers finish so the stderr tail is complete.
    pub(super) async fn drain(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(PIPE_DRAIN, reader).await;
        }
    }

    /// Stops reading (the step never started).
    pub(super) fn abort(&self) {
        self.readers.iter().for_each(JoinHandle::abort);
    }

    pub(super) fn stderr_tail(&self) -> Vec<String> {
        tail_lines(&self.stderr_tail)
    }

    /// Whether a stderr line so far named a failed allocation.
    pub(super) fn allocation_failed(&self) -> bool {
        self.stderr_tail.lock().allocation_failed
    }

    pub(super) fn take_events(&self) -> Option<EventLines> {
        self.events.as_ref().map(EventLines::take)
    }
}
