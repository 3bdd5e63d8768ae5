//! The SQS work queue against a real SQS API (moto server).

mod common;

use std::time::Duration;

use dagster_taskiq_controller::metrics::Metrics;
use dagster_taskiq_controller::queue::{
    DeadLetter, ExtendResult, QueueAdmin, RedriveFilter, Resend, SqsQueue, SqsQueueConfig,
    WorkQueue,
};

async fn send(sqs: &aws_sdk_sqs::Client, url: &str, body: &str) {
    sqs.send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn receive_extend_release_ack_and_dead_letter() {
    let moto = common::Moto::start();
    let sqs = moto.sqs();
    let (queue_url, dlq_url) = moto.queues("work", 30).await;
    let queue = SqsQueue::new(
        sqs.clone(),
        SqsQueueConfig {
            queue_url: queue_url.clone(),
            dlq_url: dlq_url.clone(),
        },
    );
    for i in 0..12 {
        send(&sqs, &queue_url, &format!("message {i}")).await;
    }
    let mut held = Vec::new();
    while held.len() < 12 {
        let batch = queue
            .receive(10, Duration::from_secs(1), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(batch.len() <= 10);
        held.extend(batch);
    }
    assert!(held.iter().all(|m| m.receive_count == 1));

    // Extensions are batched past SQS's limit of 10 entries per call.
    let handles: Vec<String> = held.iter().map(|m| m.receipt_handle.clone()).collect();
    let results = queue
        .extend(&handles, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(results, vec![ExtendResult::Extended; 12]);

    // A released message comes back at once, with its receive count raised.
    let released = held.pop().unwrap();
    queue
        .release(&released.receipt_handle, Duration::ZERO)
        .await
        .unwrap();
    let again = queue
        .receive(10, Duration::from_secs(5), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id, released.message_id);
    assert_eq!(again[0].receive_count, 2);

    // Dead-lettering carries the reason and removes the message from the work queue.
    let dead_letter = DeadLetter {
        reason: "invalid_json".into(),
        detail: "body is not valid JSON".into(),
        error_class: "poison",
        controller_id: "test-controller".into(),
    };
    queue.dead_letter(&again[0], &dead_letter).await.unwrap();
    for message in &held {
        queue.ack(&message.receipt_handle).await.unwrap();
    }
    assert_eq!(queue.depth(&queue_url).await.unwrap(), 0);
    let dead = sqs
        .receive_message()
        .queue_url(&dlq_url)
        .message_attribute_names("All")
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let dead = &dead.messages()[0];
    assert_eq!(dead.body(), Some(released.body.as_str()));
    let attributes = dead.message_attributes().unwrap();
    let attribute = |name: &str| attributes[name].string_value().unwrap().to_owned();
    assert_eq!(attribute("dagster_taskiq_error"), "invalid_json");
    assert_eq!(attribute("dagster_taskiq_error_class"), "poison");
    assert_eq!(
        attribute("dagster_taskiq_original_message_id"),
        released.message_id
    );
    assert_eq!(attribute("dagster_taskiq_receive_count"), "2");
    assert_eq!(attribute("dagster_taskiq_controller_id"), "test-controller");
}

#[tokio::test]
async fn dead_letter_queue_is_found_from_the_redrive_policy() {
    let moto = common::Moto::start();
    let sqs = moto.sqs();
    let (queue_url, dlq_url) = moto.queues("with-redrive", 30).await;
    let found = SqsQueue::discover_dlq(&sqs, &queue_url).await.unwrap();
    assert_eq!(found.as_deref(), Some(dlq_url.as_str()));

    let plain = sqs
        .create_queue()
        .queue_name("no-redrive")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    assert_eq!(SqsQueue::discover_dlq(&sqs, &plain).await.unwrap(), None);
}

#[tokio::test]
async fn redrive_moves_matching_dead_letters_back_and_counts_calls() {
    let moto = common::Moto::start();
    let sqs = moto.sqs();
    let (queue_url, dlq_url) = moto.queues("redrive", 30).await;
    let metrics = std::sync::Arc::new(Metrics::new());
    let queue = SqsQueue::new(
        sqs.clone(),
        SqsQueueConfig {
            queue_url: queue_url.clone(),
            dlq_url: dlq_url.clone(),
        },
    )
    .with_metrics(metrics.clone());
    for (i, reason) in ["invalid_json", "unknown_run", "invalid_json"]
        .iter()
        .enumerate()
    {
        send(&sqs, &queue_url, &format!(r#"{{"task_id": "t{i}"}}"#)).await;
        let held = queue
            .receive(1, Duration::from_secs(1), Duration::from_secs(30))
            .await
            .unwrap();
        let dead_letter = DeadLetter {
            reason: reason.to_string(),
            detail: "test".into(),
            error_class: "poison",
            controller_id: "test".into(),
        };
        queue.dead_letter(&held[0], &dead_letter).await.unwrap();
    }
    let (work, dlq) = queue.counts().await.unwrap();
    assert_eq!((work.visible, dlq.visible), (0, 3));

    let filter = RedriveFilter {
        reason: Some("invalid_json".into()),
        ..RedriveFilter::default()
    };
    let report = queue.redrive(10, &filter).await.unwrap();
    assert_eq!(report.moved, 2);
    assert_eq!(report.examined, 3);
    // The one left behind is visible again at once; the moved ones are in the work queue.
    let (work, dlq) = queue.counts().await.unwrap();
    assert_eq!((work.visible, dlq.visible), (2, 1));
    let back = queue
        .receive(10, Duration::from_secs(1), Duration::from_secs(30))
        .await
        .unwrap();
    let mut bodies: Vec<&str> = back.iter().map(|m| m.body.as_str()).collect();
    bodies.sort();
    assert_eq!(bodies, [r#"{"task_id": "t0"}"#, r#"{"task_id": "t2"}"#]);
    assert!(back[0]
        .attributes
        .contains_key("dagster_taskiq_redriven_from"));

    // A task-id filter and a limit of one.
    let only = RedriveFilter {
        task_id: Some("t1".into()),
        ..RedriveFilter::default()
    };
    assert_eq!(queue.redrive(1, &only).await.unwrap().moved, 1);
    assert_eq!(queue.counts().await.unwrap().1.visible, 0);

    let text = metrics.render();
    assert!(
        text.contains("dagster_taskiq_sqs_requests_total{operation=\"SendMessage\"} 6"),
        "{text}"
    );
    assert!(text.contains(
        "dagster_taskiq_sqs_request_duration_seconds_count{operation=\"GetQueueAttributes\"}"
    ));
}

/// On FIFO queues (work queue and DLQ) every send the controller makes carries a group and a
/// deduplication id: a requeued copy and a continuation get through (they are not repeats
/// of the executor's send), a second copy for the same purpose is dropped as one, dead
/// letters reach the FIFO DLQ, and a redrive brings them back.
#[tokio::test]
async fn fifo_queues_take_every_send_and_drop_only_repeats() {
    let moto = common::Moto::start();
    let sqs = moto.sqs();
    let (queue_url, dlq_url) = moto.queues("steps.fifo", 30).await;
    let queue = SqsQueue::new(
        sqs.clone(),
        SqsQueueConfig {
            queue_url: queue_url.clone(),
            dlq_url: dlq_url.clone(),
        },
    );
    let task_id = "0123456789abcdef0123456789abcdef";
    let body = format!(r#"{{"task_id": "{task_id}"}}"#);
    // As the executor sends: group and deduplication id = task id.
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body(&body)
        .message_group_id(task_id)
        .message_deduplication_id(task_id)
        .send()
        .await
        .unwrap();
    let receive = || queue.receive(10, Duration::from_secs(2), Duration::from_secs(30));
    let original = receive()
        .await
        .unwrap()
        .pop()
        .expect("the executor's message");

    // Requeued (and, on a retried call, requeued again): one copy arrives.
    let copy = Resend {
        of: &original,
        purpose: "requeue",
        attributes: [("dagster_taskiq_prior_deliveries".to_owned(), "0".to_owned())].into(),
    };
    let copy_id = queue.send(&copy).await.unwrap();
    queue.send(&copy).await.unwrap();
    // A continuation of the same message is another purpose: it gets through too.
    let continuation = Resend {
        of: &original,
        purpose: "handoff",
        attributes: [("dagster_taskiq_continuation".to_owned(), "true".to_owned())].into(),
    };
    let continuation_id = queue.send(&continuation).await.unwrap();
    queue.ack(&original.receipt_handle).await.unwrap();
    // One group per attempt: the two copies share it, so they come one after the other.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = receive().await.unwrap();
        assert!(!batch.is_empty(), "copies missing; got {seen:?}");
        for message in batch {
            assert_eq!(message.body, body);
            seen.push(message.message_id.clone());
            if message.message_id == copy_id {
                // Dead-lettered to the FIFO DLQ with its reason.
                let dead_letter = DeadLetter {
                    reason: "attempts_exhausted".into(),
                    detail: "test".into(),
                    error_class: "transient",
                    controller_id: "test-controller".into(),
                };
                queue.dead_letter(&message, &dead_letter).await.unwrap();
            } else {
                queue.ack(&message.receipt_handle).await.unwrap();
            }
        }
    }
    seen.sort();
    let mut expected = vec![copy_id, continuation_id];
    expected.sort();
    assert_eq!(seen, expected, "the repeated requeue must be dropped");
    assert!(receive().await.unwrap().is_empty());

    // The redrive sends the dead letter back to the FIFO work queue.
    let report = queue
        .redrive(
            10,
            &RedriveFilter {
                reason: Some("attempts_exhausted".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(report.moved, 1, "{report:?}");
    let back = receive().await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].body, body);
}
