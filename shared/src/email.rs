//! Sending e-mail: one small trait, [`Mailer`], with two implementations:
//! SMTP ([`SmtpMailer`], lettre; the local sink, or any relay) and Amazon
//! SES ([`SesMailer`], the v2 API) in production. Each send says whether the
//! provider took the message, surely did not, refused it for good, or may
//! have taken it (the answer was lost): the last is what a caller must not
//! send again.

use std::time::Duration;

use async_trait::async_trait;

/// One e-mail, rendered.
#[derive(Clone, Debug)]
pub struct Email {
    pub from: String,
    pub to: String,
    pub subject: String,
    pub html: String,
    /// `<…@…>`: the same for every attempt at the same e-mail, so a
    /// receiver can tell a repeat.
    pub message_id: String,
}

/// How a send failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The provider surely did not take it (no connection, a 4xx before the
    /// message was handed over, throttled): sending again is safe.
    NotSent(String),
    /// Refused for good (a 5xx, an address or sender it will not take).
    Rejected(String),
    /// The message may have been taken (the connection broke or timed out
    /// while it was handed over): sending again could deliver it twice.
    Unknown(String),
}

#[async_trait]
pub trait Mailer: Send + Sync {
    /// A short name for logs and the rate bucket (`smtp`, `ses`).
    fn name(&self) -> &'static str;
    /// Sends `email`; the provider's id for it.
    async fn send(&self, email: &Email) -> Result<String, SendError>;
}

/// SMTP through lettre. `smtp://host:port` talks plain SMTP (the local sink,
/// a relay on a private network); `smtps://` and `smtp://…?tls=required`
/// are lettre's TLS forms, with `user:password@` when the relay wants them.
pub struct SmtpMailer {
    url: String,
    /// `url` as messages show it: without credentials or query string
    /// (every send error reaches the job's members).
    shown: String,
    /// Made on first use: lettre's connection pool starts a task, which
    /// needs the runtime (the configuration is read before there is one).
    transport: tokio::sync::OnceCell<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
}

/// How long one SMTP exchange may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

impl SmtpMailer {
    /// Checks `url` now; connects on the first send.
    pub fn new(url: &str) -> Result<SmtpMailer, String> {
        Self::builder(url)?;
        Ok(SmtpMailer {
            url: url.to_string(),
            shown: crate::redact::url(url),
            transport: tokio::sync::OnceCell::new(),
        })
    }

    fn builder(url: &str) -> Result<lettre::transport::smtp::AsyncSmtpTransportBuilder, String> {
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(url)
            .map_err(|e| format!("OFFLOAD_EMAIL_TRANSPORT {:?}: {e}", crate::redact::url(url)))
    }

    fn transport(&self) -> Result<&lettre::AsyncSmtpTransport<lettre::Tokio1Executor>, SendError> {
        if let Some(t) = self.transport.get() {
            return Ok(t);
        }
        let built = Self::builder(&self.url)
            .map_err(SendError::Rejected)?
            .timeout(Some(SMTP_TIMEOUT))
            .build();
        // Two first sends at once: one of the two transports is kept.
        let _ = self.transport.set(built);
        Ok(self.transport.get().expect("set above"))
    }
}

/// Whether an error's chain holds a refused or unreachable connection (the
/// message cannot have been handed over).
fn never_connected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused | AddrNotAvailable | HostUnreachable | NetworkUnreachable
            );
        }
        cur = err.source();
    }
    false
}

#[async_trait]
impl Mailer for SmtpMailer {
    fn name(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, email: &Email) -> Result<String, SendError> {
        use lettre::message::header::ContentType;
        use lettre::AsyncTransport;
        let parse = |what: &str, a: &str| {
            a.parse::<lettre::message::Mailbox>()
                .map_err(|e| SendError::Rejected(format!("{what} {a:?} is not an address: {e}")))
        };
        let message = lettre::Message::builder()
            .from(parse("from", &email.from)?)
            .to(parse("to", &email.to)?)
            .subject(&email.subject)
            .message_id(Some(email.message_id.clone()))
            .header(ContentType::TEXT_HTML)
            .body(email.html.clone())
            .map_err(|e| SendError::Rejected(format!("cannot build the message: {e}")))?;
        match self.transport()?.send(message).await {
            Ok(_) => Ok(email.message_id.clone()),
            // "Bad sequence of commands": the connection was left part way
            // through a message (a send dropped when its task was), so
            // nothing of this one was taken; another connection will do.
            Err(e) if e.status().map(u16::from) == Some(503) => {
                Err(SendError::NotSent(format!("{}: {e}", self.shown)))
            }
            Err(e) if e.is_permanent() => Err(SendError::Rejected(format!("{}: {e}", self.shown))),
            Err(e) if e.is_transient() => Err(SendError::NotSent(format!("{}: {e}", self.shown))),
            Err(e) if never_connected(&e) => Err(SendError::NotSent(format!(
                "cannot reach {}: {e}",
                self.shown
            ))),
            Err(e) => Err(SendError::Unknown(format!("{}: {e}", self.shown))),
        }
    }
}

/// Amazon SES (API v2), in `region`; `endpoint` points it at another server
/// (moto, in the tests). The client is made on first use.
pub struct SesMailer {
    region: String,
    endpoint: Option<String>,
    client: tokio::sync::OnceCell<aws_sdk_sesv2::Client>,
}

impl SesMailer {
    pub fn new(region: &str, endpoint: Option<&str>) -> SesMailer {
        SesMailer {
            region: region.to_string(),
            endpoint: endpoint.map(str::to_string),
            client: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> &aws_sdk_sesv2::Client {
        self.client
            .get_or_init(|| async {
                aws_sdk_sesv2::Client::new(
                    &crate::config::aws_sdk_config(&self.region, self.endpoint.as_deref()).await,
                )
            })
            .await
    }
}

#[async_trait]
impl Mailer for SesMailer {
    fn name(&self) -> &'static str {
        "ses"
    }

    async fn send(&self, email: &Email) -> Result<String, SendError> {
        use aws_sdk_sesv2::error::SdkError;
        use aws_sdk_sesv2::types::{Body, Content, Destination, EmailContent, Message};
        let content = |s: &str| {
            Content::builder()
                .data(s)
                .charset("UTF-8")
                .build()
                .map_err(|e| SendError::Rejected(e.to_string()))
        };
        let message = Message::builder()
            .subject(content(&email.subject)?)
            .body(Body::builder().html(content(&email.html)?).build())
            .build();
        let sent = self
            .client()
            .await
            .send_email()
            .from_email_address(&email.from)
            .destination(Destination::builder().to_addresses(&email.to).build())
            .content(EmailContent::builder().simple(message).build())
            .send()
            .await;
        match sent {
            Ok(out) => Ok(out.message_id().unwrap_or_default().to_string()),
            Err(SdkError::ServiceError(e)) => {
                let err = e.err();
                let code = aws_sdk_sesv2::error::ProvideErrorMetadata::code(err).unwrap_or("");
                let msg = format!("SES {code}: {err}");
                if matches!(
                    code,
                    "TooManyRequestsException" | "LimitExceededException" | "Throttling"
                ) || e.raw().status().as_u16() >= 500
                {
                    Err(SendError::NotSent(msg))
                } else {
                    Err(SendError::Rejected(msg))
                }
            }
            Err(SdkError::ConstructionFailure(e)) => {
                Err(SendError::NotSent(format!("SES request not made: {e:?}")))
            }
            Err(e) => Err(SendError::Unknown(format!("SES: {e}"))),
        }
    }
}

/// The mailer `OFFLOAD_EMAIL_TRANSPORT` names: `ses` (in `region`), or an
/// SMTP URL.
pub fn from_config(transport: &str, region: &str) -> Result<std::sync::Arc<dyn Mailer>, String> {
    if transport == "ses" {
        Ok(std::sync::Arc::new(SesMailer::new(region, None)))
    } else {
        Ok(std::sync::Arc::new(SmtpMailer::new(transport)?))
    }
}

/// A sending domain's calls per second on day `days` of its warm-up: it
/// starts low and doubles each day until `full` on day `warmup_days`
/// (never under one a second).
pub fn warmup_rate(full: f64, warmup_days: u32, days: i64) -> f64 {
    if warmup_days == 0 || days >= i64::from(warmup_days) {
        return full;
    }
    let behind = i64::from(warmup_days) - days.max(0);
    (full / 2f64.powi(behind as i32)).max(1.0).min(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_domain_ramps_up_to_the_full_rate() {
        assert_eq!(warmup_rate(50.0, 7, 0), 1.0);
        assert_eq!(warmup_rate(50.0, 7, 5), 12.5);
        assert_eq!(warmup_rate(50.0, 7, 6), 25.0);
        assert_eq!(warmup_rate(50.0, 7, 7), 50.0);
        assert_eq!(warmup_rate(50.0, 7, 400), 50.0);
        assert_eq!(warmup_rate(50.0, 0, 0), 50.0);
    }
}
