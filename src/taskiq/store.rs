//! The S3 boundary: the calls the taskiq layer makes, and their aws-sdk implementation.

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::aws;
use crate::retry::Transient;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("s3://{bucket}/{key} does not exist")]
    NotFound { bucket: String, key: String },
    #[error("s3://{bucket}/{key} is at least {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        bucket: String,
        key: String,
        size: u64,
        limit: usize,
    },
    #[error("{operation} s3://{bucket}/{key} failed, may pass: {message}")]
    Transient {
        operation: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
    #[error("{operation} s3://{bucket}/{key} refused: {message}")]
    Rejected {
        operation: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
}

impl StoreError {
    /// Whether the same call may succeed later.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }
}

impl Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

/// The S3 calls of this module.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Reads an object of at most `limit` bytes.
    async fn get(&self, bucket: &str, key: &str, limit: usize) -> Result<Vec<u8>, StoreError>;
    /// Writes (or replaces) a JSON object.
    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), StoreError>;
    /// Whether the object exists.
    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StoreError>;
}

/// [`ObjectStore`] on aws-sdk-s3.
pub(crate) struct S3ObjectStore {
    client: aws_sdk_s3::Client,
}

impl S3ObjectStore {
    /// A client from the standard AWS configuration, on `endpoint` when given.
    pub(crate) fn new(aws: &aws_config::SdkConfig, endpoint: Option<&str>) -> Self {
        Self {
            client: crate::aws::s3_client(aws, endpoint),
        }
    }

    /// Fails unless the bucket exists and is reachable (HeadBucket).
    pub(crate) async fn check_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| s3_error("HeadBucket", bucket, "", e))?;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    async fn get(&self, bucket: &str, key: &str, limit: usize) -> Result<Vec<u8>, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error("GetObject", bucket, key, e))?;
        let too_large = |size: u64| StoreError::TooLarge {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            size,
            limit,
        };
        let declared = out.content_length().and_then(|n| u64::try_from(n).ok());
        if let Some(size) = declared.filter(|&n| n > limit as u64) {
            return Err(too_large(size));
        }
        let mut body = out.body;
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
        loop {
            let chunk = body.try_next().await.map_err(|e| StoreError::Transient {
                operation: "GetObject",
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                message: e.to_string(),
            })?;
            let Some(chunk) = chunk else { break };
            if bytes.len() + chunk.len() > limit {
                return Err(too_large((bytes.len() + chunk.len()) as u64));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(body.into())
            .send()
            .await
            .map_err(|e| s3_error("PutObject", bucket, key, e))?;
        Ok(())
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        match self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match s3_error("HeadObject", bucket, key, e) {
                StoreError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }
}

fn s3_error<E>(
    operation: &'static str,
    bucket: &str,
    key: &str,
    err: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let failure = aws::classify(&err);
    let (bucket, key) = (bucket.to_owned(), key.to_owned());
    let code = failure.code.as_deref().unwrap_or_default();
    if matches!(code, "NoSuchKey" | "NotFound") || (failure.status == Some(404) && code.is_empty())
    {
        return StoreError::NotFound { bucket, key };
    }
    let message = failure.text;
    if failure.class.retryable() {
        StoreError::Transient {
            operation,
            bucket,
            key,
            message,
        }
    } else {
        StoreError::Rejected {
            operation,
            bucket,
            key,
            message,
        }
    }
}
