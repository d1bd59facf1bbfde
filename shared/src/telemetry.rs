//! Logging set-up: JSON lines in Lambda (CloudWatch parses them), readable
//! lines on a laptop. `RUST_LOG` filters either way. Every line passes
//! through [`crate::redact::text`] on its way out, so a URL in an error
//! (a relay's, a provider's, an endpoint's) never shows its credentials or
//! query string in operators' log stores either.

use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Makes a [`Redacted`] writer per event over `M`'s writer.
pub struct Redacting<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = Redacted<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Redacted {
            line: Vec::new(),
            out: self.0.make_writer(),
        }
    }
}

/// One event's text, held until the event is written whole (the formatter
/// writes each event to its own writer), then redacted and passed on.
pub struct Redacted<W: Write> {
    line: Vec<u8>,
    out: W,
}

impl<W: Write> Write for Redacted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for Redacted<W> {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let _ = self.out.write_all(crate::redact::text(&text).as_bytes());
        let _ = self.out.flush();
    }
}

/// Installs the global subscriber once; later calls are no-ops. `in_lambda`
/// chooses JSON lines (see [`crate::config::Config::in_lambda`]).
pub fn init(in_lambda: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,refinery_core=warn,tokio_postgres=warn"));
    // Logs go to stderr: stdout is for what a command prints (the lines
    // `offload dev` prints to paste into a shell, a token, an id).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Redacting(std::io::stderr));
    let _ = if in_lambda {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .without_time()
            .try_init()
    } else {
        builder.with_target(false).compact().try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn operators_logs_never_show_a_urls_credentials() {
        let buf = Buffer::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(Redacting(move || sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                error = "smtps://mailer:Hunter2@relay.example.com:465: connection refused",
                hook = "https://hooks.example.com/in?token=s3cr3t",
                "cannot send"
            );
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.contains("relay.example.com:465"), "{out}");
        assert!(out.contains("https://hooks.example.com/in"), "{out}");
        assert!(!out.contains("Hunter2") && !out.contains("s3cr3t"), "{out}");
        let line: serde_json::Value = serde_json::from_str(out.trim()).expect("still JSON");
        assert_eq!(line["fields"]["message"], "cannot send");
    }
}
