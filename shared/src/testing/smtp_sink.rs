//! The SMTP sink the e-mail tests and the benchmark send to: aiosmtpd (from
//! PyPI, installed into `.local/venv` by the scripts) running
//! `scripts/smtp_sink.py`, which keeps each message as a JSON line.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A running sink; it stops when dropped.
pub struct SmtpSink {
    pub port: u16,
    out: tempfile::NamedTempFile,
    child: Child,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The virtualenv's Python that runs the sink.
fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.local/venv/bin/python")
}

impl SmtpSink {
    /// Why a sink cannot start here, saying how to fix it; `None` when it can.
    pub fn missing() -> Option<String> {
        let python = python();
        let found = Command::new(&python)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!found).then(|| {
            format!(
                "aiosmtpd is not in {}: run scripts/test.sh once, or \
                 `python3 -m venv .local/venv && .local/venv/bin/pip install aiosmtpd`",
                python.display()
            )
        })
    }

    /// Starts a sink on a free loopback port. Panics, saying what to do,
    /// when the venv with aiosmtpd is missing.
    pub fn start() -> SmtpSink {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = python();
        assert!(
            python.exists(),
            "{} is missing: run scripts/test.sh once (it installs aiosmtpd for the SMTP sink)",
            python.display()
        );
        let out = tempfile::NamedTempFile::new().expect("a file for the sink");
        let port = super::free_port();
        let mut child = Command::new(python)
            .arg(root.join("scripts/smtp_sink.py"))
            .args(["--port", &port.to_string(), "--out"])
            .arg(out.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the SMTP sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("its stdout"))
            .read_line(&mut line)
            .expect("the sink's first line");
        assert_eq!(
            line.trim(),
            "ready",
            "the SMTP sink did not start (aiosmtpd installed?)"
        );
        SmtpSink { port, out, child }
    }

    /// `smtp://127.0.0.1:{port}`, for [`crate::email::SmtpMailer`].
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<Value> {
        std::fs::read_to_string(self.out.path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
