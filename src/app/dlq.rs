//! The `dlq` subcommand: list dead letters, redrive them to the work queue.

use std::time::Duration;

use anyhow::{bail, Context as _};

use dagster_taskiq_controller::aws;
use dagster_taskiq_controller::config::{DlqAction, DlqArgs};
use dagster_taskiq_controller::queue::{DeadLetterEntry, RedriveFilter, SqsQueue, SqsQueueConfig};

pub(crate) async fn dlq(args: DlqArgs) -> anyhow::Result<()> {
    let aws = aws::load(Duration::from_secs(30)).await;
    let sqs = aws::sqs_client(&aws);
    let dlq_url = match args.dlq_url {
        Some(url) => url,
        None => SqsQueue::discover_dlq(&sqs, &args.queue_url)
            .await
            .with_context(|| format!("cannot read the work queue {}", args.queue_url))?
            .with_context(|| {
                format!(
                    "the work queue {} has no RedrivePolicy: pass --dlq-url",
                    args.queue_url
                )
            })?,
    };
    let queue = SqsQueue::new(
        sqs,
        SqsQueueConfig {
            queue_url: args.queue_url,
            dlq_url,
        },
    );
    match args.action {
        DlqAction::List { max, json } => {
            let entries = queue
                .list_dead_letters(max)
                .await
                .context("cannot read the dead-letter queue")?;
            let now = chrono::Utc::now();
            if json {
                for entry in &entries {
                    println!("{}", serde_json::to_string(entry)?);
                }
            } else {
                print!("{}", dead_letter_table(&entries, now));
            }
        }
        DlqAction::Redrive {
            reason,
            run_id,
            task_id,
            all: _,
            max,
        } => {
            let filter = RedriveFilter {
                reason,
                run_id,
                task_id,
            };
            match queue.redrive_where(max, |m| filter.matches(m)).await {
                Ok(report) => println!(
                    "moved {} of {} dead letter(s) examined back to the work queue",
                    report.moved, report.examined
                ),
                Err(e) => bail!("{e}"),
            }
        }
    }
    Ok(())
}

/// Dead letters as an aligned text table, newest first.
fn dead_letter_table(entries: &[DeadLetterEntry], now: chrono::DateTime<chrono::Utc>) -> String {
    let dash = || "-".to_owned();
    let mut rows: Vec<[String; 6]> = vec![[
        "AGE".into(),
        "REASON".into(),
        "RUN".into(),
        "STEP".into(),
        "TASK".into(),
        "DETAIL".into(),
    ]];
    let mut sorted: Vec<&DeadLetterEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.dead_lettered_at));
    for e in sorted {
        rows.push([
            e.dead_lettered_at
                .map(|at| format_age(now - at))
                .unwrap_or_else(dash),
            e.reason.clone().unwrap_or_else(|| "(moved by SQS)".into()),
            e.run_id.clone().unwrap_or_else(dash),
            e.step_key.clone().unwrap_or_else(dash),
            e.task_id.clone().unwrap_or_else(dash),
            e.detail
                .as_deref()
                .map(|d| d.chars().take(80).collect())
                .unwrap_or_else(dash),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        for (i, width) in widths.iter().enumerate() {
            out.push_str(&format!("{:width$}  ", row[i]));
        }
        out.push_str(&row[5]);
        out.push('\n');
    }
    out.push_str(&format!("{} dead letter(s)\n", entries.len()));
    out
}

fn format_age(age: chrono::TimeDelta) -> String {
    let secs = age.num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}
