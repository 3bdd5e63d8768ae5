//! The SQS work queue against a real SQS API (moto server).

mod common;

use std::time::Duration;

use dagster_taskiq_controller::queue::{
    DeadLetter, ExtendResult, SqsQueue, SqsQueueConfig, WorkQueue,
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
