use super::*;

use chrono::Duration;

/// A virtual clock: minute 0 is a fixed instant, never the wall clock.
fn at(minute: i64, second: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 0, 0).unwrap() + Duration::seconds(minute * 60 + second)
}

#[test]
fn events_land_in_their_minute_and_the_minute_rolls_over() {
    let history = History::default();
    history.record_launch(at(0, 1), 0.2);
    history.record_launch(at(0, 59), 0.4);
    history.record_outcome(at(0, 59), "succeeded");
    history.record_launch(at(1, 0), 3.0);
    history.record_outcome(at(1, 0), "succeeded");
    history.record_outcome(at(1, 30), "verdict");
    let view = history.view(at(1, 45)).minutes;
    assert_eq!(view.len(), MINUTES);
    let (before, now) = (&view[MINUTES - 2], &view[MINUTES - 1]);
    assert_eq!(before.start, at(0, 0));
    assert_eq!(now.start, at(1, 0));
    assert_eq!(before.launches, 2);
    assert_eq!(before.outcomes, BTreeMap::from([("succeeded", 1)]));
    assert_eq!(now.launches, 1);
    assert_eq!(
        now.outcomes,
        BTreeMap::from([("succeeded", 1), ("verdict", 1)])
    );
    // The rest of the hour is there, empty.
    assert!(view[..MINUTES - 2]
        .iter()
        .all(|m| m.launches == 0 && m.queue_depth.is_none() && m.start_latency_p50.is_none()));
    assert_eq!(view[0].start, at(-58, 0));
}

#[test]
fn the_ring_keeps_one_hour_however_long_it_runs() {
    let history = History::default();
    for minute in 0..500 {
        history.record_launch(at(minute, 5), 0.1);
        history.record_in_flight(at(minute, 6), minute as usize);
        assert!(history.len() <= MINUTES);
    }
    assert_eq!(history.len(), MINUTES);
    let view = history.view(at(499, 30)).minutes;
    assert_eq!(view.first().unwrap().start, at(440, 0));
    assert_eq!(view.first().unwrap().in_flight, Some(440));
    assert_eq!(view.last().unwrap().in_flight, Some(499));
    assert!(view.iter().all(|m| m.launches == 1));
    // A gap longer than the hour drops everything before it.
    history.record_launch(at(700, 0), 0.1);
    assert_eq!(history.len(), 1);
    let view = history.view(at(700, 1)).minutes;
    assert_eq!(view.iter().map(|m| m.launches).sum::<u32>(), 1);
}

#[test]
fn a_record_older_than_the_newest_minute_goes_to_its_own_minute_or_nowhere() {
    let history = History::default();
    history.record_launch(at(10, 0), 0.1);
    history.record_launch(at(11, 0), 0.1);
    // Late, but its minute is there.
    history.record_outcome(at(10, 59), "succeeded");
    // Before the first kept minute, or a clock stepped back past the hour: dropped.
    history.record_outcome(at(9, 0), "succeeded");
    history.record_outcome(at(-100, 0), "succeeded");
    assert_eq!(history.len(), 2);
    let view = history.view(at(11, 1)).minutes;
    assert_eq!(
        view[MINUTES - 2].outcomes,
        BTreeMap::from([("succeeded", 1)])
    );
    assert!(view[..MINUTES - 2].iter().all(|m| m.outcomes.is_empty()));
    // A view from before the newest minute shows what falls in its hour.
    let earlier = history.view(at(10, 30)).minutes;
    assert_eq!(earlier.last().unwrap().launches, 1);
}

#[test]
fn start_latency_quantiles_come_from_the_minutes_histogram() {
    let history = History::default();
    for _ in 0..98 {
        history.record_launch(at(0, 0), 0.1);
    }
    history.record_launch(at(0, 0), 30.0);
    history.record_launch(at(0, 0), 30.0);
    let minute = history.view(at(0, 1)).minutes.pop().unwrap();
    let (p50, p99) = (
        minute.start_latency_p50.unwrap(),
        minute.start_latency_p99.unwrap(),
    );
    assert!((0.1..0.15).contains(&p50), "{p50}");
    assert!((30.0..45.0).contains(&p99), "{p99}");
    // Past the last bound, and below zero (a clock step), still counted.
    history.record_launch(at(1, 0), 1e9);
    history.record_launch(at(1, 0), -1.0);
    let minute = history.view(at(1, 1)).minutes.pop().unwrap();
    assert_eq!(minute.launches, 2);
    assert_eq!(minute.start_latency_p50, Some(latency_bound(0)));
    assert_eq!(
        minute.start_latency_p99,
        Some(latency_bound(LATENCY_BUCKETS - 1))
    );
}

#[test]
fn gauges_keep_the_largest_value_of_their_minute() {
    let history = History::default();
    history.record_queue_depth(at(0, 0), 40);
    history.record_queue_depth(at(0, 20), 7);
    history.record_in_flight(at(0, 0), 3);
    history.record_in_flight(at(0, 50), 1);
    let minute = history.view(at(0, 55)).minutes.pop().unwrap();
    assert_eq!((minute.queue_depth, minute.in_flight), (Some(40), Some(3)));
}

#[test]
fn outcome_names_per_minute_are_bounded() {
    let history = History::default();
    let names: Vec<&'static str> = (0..200)
        .map(|i| &*Box::leak(format!("outcome_{i}").into_boxed_str()))
        .collect();
    for name in &names {
        history.record_outcome(at(0, 0), name);
    }
    history.record_outcome(at(0, 0), names[0]);
    let minute = history.view(at(0, 1)).minutes.pop().unwrap();
    assert_eq!(minute.outcomes.len(), MAX_OUTCOME_NAMES);
    assert_eq!(minute.outcomes[names[0]], 2);
}
