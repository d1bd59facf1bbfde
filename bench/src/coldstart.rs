//! Cold starts: each function's release binary started the way Lambda
//! starts it (against the Runtime API stand-in of `offload::testing`), ten
//! fresh processes each. Init is the time from the process's start to its
//! first request for an event (connecting to the database and checking its
//! schema included); for the api, the first request end to end is the time
//! from the process's start to the answer of the sample create event.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use offload::testing::{Invoked, LambdaRuntime, TEST_SECRET};
use serde_json::Value;

use super::BenchDb;

/// Where `cargo build --release --bins` put the function binaries.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: run `cargo build --release --bins` first",
        path.display()
    );
    Ok(path)
}

/// Median init time of `name` over `runs` fresh starts, ms; with `event`,
/// also the median time from start to its answer.
pub async fn measure(
    db: &BenchDb,
    name: &str,
    runs: usize,
    event: Option<&Value>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, u64)> {
    let path = binary(name)?;
    let size = std::fs::metadata(&path)?.len();
    let (mut init, mut first) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut rt = LambdaRuntime::serve().await;
        let started = Instant::now();
        rt.start(
            path.to_str().unwrap_or_default(),
            &format!("offload-{name}"),
            &[
                ("DATABASE_URL", db.url.clone()),
                ("OFFLOAD_JWT_SECRET", TEST_SECRET.into()),
            ],
        );
        match event {
            Some(e) => {
                let answer = rt.invoke(e.clone(), Duration::from_secs(30)).await;
                anyhow::ensure!(matches!(answer, Invoked::Response(_)), "{name}: {answer:?}");
                first.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            None => {
                let end = Instant::now() + Duration::from_secs(30);
                while rt.init_duration().is_none() {
                    anyhow::ensure!(Instant::now() < end, "{name} never asked for an event");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let d = rt
            .init_duration()
            .ok_or_else(|| anyhow::anyhow!("{name} never asked for an event"))?;
        init.push(d.as_secs_f64() * 1000.0);
    }
    Ok((init, first, size))
}
