//! A step's serialized `DagsterEvent` lines: the bounded buffer the local launchers fill from
//! its stdout when [`StepRequest::collect_events`] is set (the taskiq result returns them).

use std::sync::Arc;

use parking_lot::Mutex;
use serde::Deserialize;

use crate::envelope::StepRequest;

/// Largest total size of the event lines kept for one step's result; past it the result is an
/// error that says so (the events are still in Dagster's event log).
pub(crate) const MAX_EVENT_BYTES: usize = 32 * 1024 * 1024;

/// The serialized `DagsterEvent` lines of one step's stdout, in order, at most
/// [`MAX_EVENT_BYTES`] of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventLines {
    pub lines: Vec<String>,
    /// Total length of `lines`.
    pub bytes: usize,
    /// Lines dropped because the limit was reached.
    pub dropped: usize,
}

/// Shared between a step's stdout reader and its [`crate::launcher::RunningStep`].
pub(crate) type EventSink = Arc<Mutex<EventLines>>;

impl EventLines {
    /// Keeps the line unless the limit is reached; false when it was dropped.
    pub(crate) fn push(&mut self, line: String) -> bool {
        if self.dropped > 0 || self.bytes + line.len() > MAX_EVENT_BYTES {
            self.dropped += 1;
            return false;
        }
        self.bytes += line.len();
        self.lines.push(line);
        true
    }

    /// Counts a line that was not kept (cut at the line bound: no longer an event).
    pub(crate) fn drop_line(&mut self) {
        self.dropped += 1;
    }

    /// A sink for this step, when its events are to be collected.
    pub(crate) fn sink_for(step: &StepRequest) -> Option<EventSink> {
        step.collect_events.then(EventSink::default)
    }

    /// Takes what a sink holds.
    pub(crate) fn take(sink: &EventSink) -> EventLines {
        std::mem::take(&mut *sink.lock())
    }
}

/// Whether a stdout line (or its start) begins the way Dagster serializes an event: its keys
/// are sorted, so `__class__` comes first. Such a line may be long (big metadata, a deep
/// stack trace); others are cut at the usual line bound.
pub(crate) fn starts_like_an_event(line: &[u8]) -> bool {
    line.trim_ascii_start()
        .starts_with(br#"{"__class__": "DagsterEvent""#)
}

/// Whether a stdout line is a serialized `DagsterEvent` (Dagster's `serialize_value` output:
/// a JSON object whose `__class__` is `DagsterEvent`), as `dagster api execute_step` prints
/// them with `print_serialized_events`.
pub(crate) fn is_serialized_event(line: &str) -> bool {
    #[derive(Deserialize)]
    struct Class<'a> {
        #[serde(rename = "__class__", borrow)]
        class: Option<&'a str>,
    }
    let line = line.trim();
    line.starts_with('{')
        && line.contains("\"DagsterEvent\"")
        && serde_json::from_str::<Class>(line).is_ok_and(|c| c.class == Some("DagsterEvent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialized_events_are_told_from_other_output() {
        assert!(is_serialized_event(
            r#"{"__class__": "DagsterEvent", "event_type_value": "STEP_SUCCESS"}"#
        ));
        assert!(!is_serialized_event("hello from the op"));
        assert!(!is_serialized_event(r#"{"__class__": "DagsterRun"}"#));
        assert!(!is_serialized_event(r#"{"note": "DagsterEvent"}"#));
        assert!(!is_serialized_event(r#"{"__class__": "DagsterEvent""#));
        assert!(starts_like_an_event(
            br#" {"__class__": "DagsterEvent", "event"#
        ));
        assert!(!starts_like_an_event(br#"{"note": "DagsterEvent"}"#));
    }

    #[test]
    fn event_lines_stop_at_the_limit() {
        let mut events = EventLines::default();
        assert!(events.push("a".repeat(MAX_EVENT_BYTES - 1)));
        assert!(!events.push("bb".into()));
        assert!(!events.push("c".into()), "nothing after the first drop");
        assert_eq!((events.lines.len(), events.dropped), (1, 2));
    }
}
