//! Logging set-up: JSON lines in Lambda (CloudWatch parses them), readable
//! lines on a laptop. `RUST_LOG` filters either way.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are no-ops. `in_lambda`
/// chooses JSON lines (see [`crate::config::Config::in_lambda`]).
pub fn init(in_lambda: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,refinery_core=warn,tokio_postgres=warn"));
    // Logs go to stderr: stdout is for what a command prints (the lines
    // `offload dev` prints to paste into a shell, a token, an id).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
