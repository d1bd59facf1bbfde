//! Helpers shared by `offload-bench` and `offload-soak`.

pub use offload::testing::with_db;

/// Makes an empty database `name` on the server of `server` (dropping one
/// left by an earlier run) and returns its URL.
pub async fn fresh_database(server: &str, name: &str) -> anyhow::Result<String> {
    let admin = offload::db::connect(&with_db(server, "postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(with_db(server, name))
}

/// Drops database `name` on the server of `server`.
pub async fn drop_database(server: &str, name: &str) -> anyhow::Result<()> {
    let admin = offload::db::connect(&with_db(server, "postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// The value at fraction `p` (0..=1) of an ascending `sorted` slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_swapped_and_queries_kept() {
        assert_eq!(
            with_db("postgres://u:p@h:5432/offload?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.5), 3.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 1.0), 5.0);
    }
}
