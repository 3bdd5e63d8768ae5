//! One reading of an AWS SDK error for every service: the service's code, message and HTTP
//! status when it answered, and what retrying can do about it.

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// What retrying a failed call can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// AWS said slow down (`ThrottlingException`, `SlowDown`, HTTP 429, or ECS's
    /// `InvalidParameterException` "Rate exceeded", which the SDK does not retry itself).
    Throttled,
    /// 5xx, timeouts, connection failures: the call may not even have happened.
    Transient,
    /// The request is wrong or not allowed: the same call will fail again.
    Permanent,
}

impl ErrorClass {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ErrorClass::Throttled => "throttled",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }

    /// Whether the same call may succeed later.
    pub(crate) fn retryable(self) -> bool {
        self != ErrorClass::Permanent
    }
}

/// A failed SDK call, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SdkFailure {
    pub class: ErrorClass,
    /// The service's error code (`NoSuchKey`, `ThrottlingException`), when it answered.
    pub code: Option<String>,
    /// The service's own message, when it answered.
    pub service_message: Option<String>,
    /// The HTTP status, when it answered.
    pub status: Option<u16>,
    /// The whole error with its causes, for logs and error texts.
    pub text: String,
}

/// Reads an SDK error of any service.
pub(crate) fn classify<E>(err: &SdkError<E, HttpResponse>) -> SdkFailure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let text = DisplayErrorContext(err).to_string();
    match err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().map(str::to_owned);
            let service_message = ctx.err().message().map(str::to_owned);
            let status = ctx.raw().status().as_u16();
            SdkFailure {
                class: class_of(
                    code.as_deref(),
                    service_message.as_deref().unwrap_or_default(),
                    Some(status),
                ),
                code,
                service_message,
                status: Some(status),
                text,
            }
        }
        SdkError::ConstructionFailure(_) => SdkFailure {
            class: ErrorClass::Permanent,
            code: None,
            service_message: None,
            status: None,
            text,
        },
        // Timeouts, dispatch and response failures: the call may not have happened.
        _ => SdkFailure {
            class: ErrorClass::Transient,
            code: None,
            service_message: None,
            status: None,
            text,
        },
    }
}

/// The class of a service's answer, by its error code, message and HTTP status. The codes
/// are those of SQS, S3 and ECS; none means something else in another of them.
pub(crate) fn class_of(code: Option<&str>, message: &str, status: Option<u16>) -> ErrorClass {
    let code = code.unwrap_or_default();
    let throttled = code.contains("Throttl")
        || code.contains("OverLimit")
        || matches!(
            code,
            "TooManyRequestsException" | "RequestLimitExceeded" | "SlowDown"
        )
        || (code == "InvalidParameterException" && message.contains("Rate exceeded"))
        || status == Some(429);
    if throttled {
        ErrorClass::Throttled
    } else if matches!(
        code,
        "ServerException" | "ServiceUnavailable" | "InternalError" | "RequestTimeout"
    ) || status.is_some_and(|s| s >= 500)
    {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_in_every_shape_is_throttled() {
        for code in [
            "ThrottlingException",
            "Throttling",
            "RequestThrottled",
            "AWS.SimpleQueueService.RequestThrottled",
            "OverLimit",
            "SlowDown",
            "TooManyRequestsException",
            "RequestLimitExceeded",
        ] {
            assert_eq!(
                class_of(Some(code), "", Some(400)),
                ErrorClass::Throttled,
                "{code}"
            );
        }
        assert_eq!(
            class_of(Some("InvalidParameterException"), "Rate exceeded", None),
            ErrorClass::Throttled
        );
        assert_eq!(class_of(None, "", Some(429)), ErrorClass::Throttled);
    }

    #[test]
    fn server_failures_are_transient_and_refusals_permanent() {
        assert_eq!(
            class_of(Some("ServerException"), "boom", None),
            ErrorClass::Transient
        );
        assert_eq!(
            class_of(Some("RequestTimeout"), "", Some(400)),
            ErrorClass::Transient
        );
        assert_eq!(class_of(None, "", Some(503)), ErrorClass::Transient);
        assert_eq!(
            class_of(
                Some("InvalidParameterException"),
                "No Container Instances were found",
                None
            ),
            ErrorClass::Permanent
        );
        assert_eq!(
            class_of(
                Some("ClientException"),
                "Unable to describe task definition.",
                Some(400)
            ),
            ErrorClass::Permanent
        );
        assert_eq!(
            class_of(Some("AccessDeniedException"), "", None),
            ErrorClass::Permanent
        );
        assert_eq!(
            class_of(Some("NoSuchBucket"), "", Some(404)),
            ErrorClass::Permanent
        );
    }
}
