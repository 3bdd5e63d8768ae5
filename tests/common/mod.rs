//! Test harness: a moto server on 127.0.0.1 (a free port), and SDK clients pointed at it.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};

/// A moto server that is killed when dropped.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_executable() -> PathBuf {
    if let Ok(path) = std::env::var("MOTO_SERVER") {
        return PathBuf::from(path);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Moto {
    /// Starts moto and waits until it accepts connections.
    pub fn start() -> Moto {
        let port = free_port();
        let executable = moto_executable();
        let child = Command::new(&executable)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run `make setup` or set MOTO_SERVER",
                    executable.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&self.url)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .build();
        aws_sdk_sqs::Client::from_conf(config)
    }

    /// A work queue with a dead-letter queue; returns (queue_url, dlq_url). A name ending
    /// in `.fifo` makes both FIFO queues (SQS requires a FIFO queue's DLQ to be FIFO).
    pub async fn queues(&self, name: &str, visibility_secs: u32) -> (String, String) {
        let sqs = self.sqs();
        let fifo = name.ends_with(".fifo");
        let fifo_attribute =
            |create: aws_sdk_sqs::operation::create_queue::builders::CreateQueueFluentBuilder| {
                if fifo {
                    create.attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
                } else {
                    create
                }
            };
        let dlq_name = match name.strip_suffix(".fifo") {
            Some(base) => format!("{base}-dlq.fifo"),
            None => format!("{name}-dlq"),
        };
        let dlq_url = fifo_attribute(sqs.create_queue().queue_name(dlq_name))
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        let queue_url = fifo_attribute(sqs.create_queue().queue_name(name))
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
                visibility_secs.to_string(),
            )
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
                format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"10"}}"#),
            )
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        (queue_url, dlq_url)
    }
}
