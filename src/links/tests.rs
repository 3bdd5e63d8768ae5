use super::*;

const ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task/steps/0f3c8a1b2d4e4f5a9b7c6d5e4f3a2b1c";

#[test]
fn the_dagster_url_must_be_an_http_base_url() {
    for bad in [
        "",
        "dagster:3000",
        "javascript:alert(1)",
        "ftp://dagster/",
        "http://",
        "https:",
        "http://dagster:3000/?x=1",
        "http://dagster:3000/#frag",
        "http://user:secret@dagster:3000/",
    ] {
        assert!(DagsterUi::parse(bad).is_err(), "{bad:?} accepted");
    }
    let ui = DagsterUi::parse("https://dagster.example.com/").unwrap();
    assert_eq!(
        ui.run("abc-123"),
        "https://dagster.example.com/runs/abc-123"
    );
    let prefixed = DagsterUi::parse("http://10.0.0.5:3000/dagster").unwrap();
    assert_eq!(prefixed.run("r1"), "http://10.0.0.5:3000/dagster/runs/r1");
}

#[test]
fn a_step_link_selects_the_step_and_filters_the_logs() {
    let ui = DagsterUi::parse("http://localhost:3000").unwrap();
    assert_eq!(
        ui.step("8a7c", "my_op"),
        "http://localhost:3000/runs/8a7c?selection=my_op&logs=step%3Amy_op"
    );
}

#[test]
fn run_ids_and_step_keys_from_messages_cannot_leave_their_url_component() {
    let ui = DagsterUi::parse("http://localhost:3000").unwrap();
    let run = ui.run("../../admin?x=\"><script>alert(1)</script>#y");
    assert_eq!(
        run,
        "http://localhost:3000/runs/..%2F..%2Fadmin%3Fx=%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E%23y"
    );
    let step = ui.step("r", "a&logs=x#\"'<b> op[0]");
    let parsed = Url::parse(&step).unwrap();
    let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    assert_eq!(
        pairs,
        [
            ("selection".to_owned(), "a&logs=x#\"'<b> op[0]".to_owned()),
            ("logs".to_owned(), "step:a&logs=x#\"'<b> op[0]".to_owned()),
        ]
    );
    assert_eq!(parsed.fragment(), None);
    for text in [run.as_str(), step.as_str()] {
        assert!(!text.contains(['"', '<', '>', '\'', ' ']), "{text}");
    }
}

#[test]
fn an_ecs_step_links_to_its_task_and_log_stream() {
    let logs = AwsLogs {
        group: "/ecs/dagster-steps".into(),
        stream_prefix: Some("steps".into()),
        region: None,
    };
    let links = ecs_links(ARN, "step", Some(&logs));
    assert_eq!(
        links,
        [
            Link {
                kind: "ecs_task",
                url: "https://eu-west-1.console.aws.amazon.com/ecs/v2/clusters/steps/tasks/\
                      0f3c8a1b2d4e4f5a9b7c6d5e4f3a2b1c?region=eu-west-1"
                    .into(),
            },
            Link {
                kind: "cloudwatch_logs",
                url: "https://eu-west-1.console.aws.amazon.com/cloudwatch/home?region=eu-west-1\
                      #logsV2:log-groups/log-group/$252Fecs$252Fdagster-steps/log-events/\
                      steps$252Fstep$252F0f3c8a1b2d4e4f5a9b7c6d5e4f3a2b1c"
                    .into(),
            },
        ]
    );
    // Logs in another region; no stream prefix: the group only.
    let elsewhere = AwsLogs {
        group: "g".into(),
        stream_prefix: None,
        region: Some("us-east-2".into()),
    };
    let links = ecs_links(ARN, "step", Some(&elsewhere));
    assert_eq!(
        links[1].url,
        "https://us-east-2.console.aws.amazon.com/cloudwatch/home?region=us-east-2\
         #logsV2:log-groups/log-group/g"
    );
    assert_eq!(ecs_links(ARN, "step", None).len(), 1);
    let cn = ecs_links("arn:aws-cn:ecs:cn-north-1:1:task/c/0123abcd", "step", None);
    assert!(
        cn[0].url.starts_with(
            "https://console.amazonaws.cn/ecs/v2/clusters/c/tasks/0123abcd?region=cn-north-1"
        ),
        "{cn:?}"
    );
}

#[test]
fn a_task_arn_that_is_not_one_gives_no_link() {
    for arn in [
        "",
        "pid 1234",
        "arn:aws:ecs:eu-west-1:1:task/0f3c8a1b",
        "arn:aws:ecs:eu-west-1:1:task/c/x/y",
        "arn:aws:s3:eu-west-1:1:task/c/abc",
        "arn:evil:ecs:eu-west-1:1:task/c/abc",
        "arn:aws:ecs:evil.com/x:1:task/c/abc",
        "arn:aws:ecs:eu-west-1:1:task/c\"><script>/abc",
        "arn:aws:ecs:eu-west-1:1:task/c/abc?x=1",
    ] {
        assert_eq!(ecs_links(arn, "step", None), [], "{arn:?}");
    }
    // A log option from the task definition with odd characters stays inside the fragment.
    let logs = AwsLogs {
        group: "a#b\"<c>".into(),
        stream_prefix: Some("p q".into()),
        region: Some("not a region".into()),
    };
    assert_eq!(ecs_links(ARN, "step", Some(&logs)).len(), 1);
    let logs = AwsLogs {
        region: None,
        ..logs
    };
    let url = &ecs_links(ARN, "step", Some(&logs))[1].url;
    assert!(url.ends_with("log-group/a$2523b$2522$253Cc$253E/log-events/p$2520q$252Fstep$252F0f3c8a1b2d4e4f5a9b7c6d5e4f3a2b1c"), "{url}");
}
