//! Secrets read from AWS Secrets Manager by ARN, at cold start, kept for the
//! container's life, and read again when the database refuses the password
//! (a rotation). Each function is given only the ARNs it uses, and its role
//! may read only those (template.yaml). Locally the plain environment
//! variables (`DATABASE_URL`, `OFFLOAD_JWT_SECRET`) still work.

use std::sync::Arc;

use thiserror::Error;

#[derive(Debug, Error)]
#[error("{variable}: cannot read the secret {arn}: {reason}")]
pub struct SecretError {
    pub variable: &'static str,
    pub arn: String,
    pub reason: String,
}

/// One secret: its ARN, and the JSON key its value is under (a secret that
/// is a plain string, not JSON, is the value itself).
#[derive(Clone)]
pub struct Secret {
    client: aws_sdk_secretsmanager::Client,
    /// The variable that named the ARN, for messages.
    pub variable: &'static str,
    pub arn: String,
    pub key: &'static str,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("variable", &self.variable)
            .field("arn", &self.arn)
            .field("key", &self.key)
            .finish()
    }
}

/// A Secrets Manager client for `region`, or for a local server speaking
/// its API (`endpoint`, e.g. moto) with local credentials if none are set.
pub async fn client(region: &str, endpoint: Option<&str>) -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(&crate::config::aws_sdk_config(region, endpoint).await)
}

impl Secret {
    pub fn new(
        client: aws_sdk_secretsmanager::Client,
        variable: &'static str,
        arn: &str,
        key: &'static str,
    ) -> Secret {
        Secret {
            client,
            variable,
            arn: arn.to_string(),
            key,
        }
    }

    /// The secret's current value.
    pub async fn fetch(&self) -> Result<String, SecretError> {
        let fail = |reason: String| SecretError {
            variable: self.variable,
            arn: self.arn.clone(),
            reason,
        };
        let out = self
            .client
            .get_secret_value()
            .secret_id(&self.arn)
            .send()
            .await
            .map_err(|e| fail(aws_sdk_secretsmanager::error::DisplayErrorContext(e).to_string()))?;
        let raw = out
            .secret_string()
            .ok_or_else(|| fail("it has no string value".into()))?;
        match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::Object(map)) => map
                .get(self.key)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    fail(format!(
                        "its JSON has no string under the key {:?}",
                        self.key
                    ))
                }),
            _ => Ok(raw.trim().to_string()),
        }
    }

    /// A [`crate::db::Refresh`] that reads this secret again and turns it
    /// into a connection URL with `prepare`.
    pub fn refresher(
        self: Arc<Self>,
        prepare: impl Fn(String) -> Result<String, String> + Send + Sync + 'static,
    ) -> crate::db::Refresh {
        let prepare = Arc::new(prepare);
        Arc::new(move || {
            let (secret, prepare) = (self.clone(), prepare.clone());
            Box::pin(async move {
                let value = secret.fetch().await.map_err(|e| e.to_string())?;
                prepare(value)
            })
        })
    }
}
