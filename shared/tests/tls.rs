//! TLS to PostgreSQL as `DATABASE_URL` asks for it (`sslmode`,
//! `sslrootcert`, `OFFLOAD_DB_CA_FILE`), against a real server that accepts
//! only TLS, with certificates the test makes.

use std::time::Duration;

use offload::config::Config;
use offload::db;
use offload::queue::PgQueue;
use offload::testing::TlsServer;

/// A fresh database on the TLS server; returns its name.
async fn fresh_db(server: &TlsServer) -> String {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = db::connect(&server.url("127.0.0.1", "postgres", "sslmode=require"))
        .await
        .expect("connect with sslmode=require");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    name
}

/// Whether the session of `client` is encrypted, as the server sees it.
async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn refused(url: &str) -> String {
    match db::connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn require_connects_encrypted_without_checking_the_certificate() {
    let s = TlsServer::get().await;
    let name = fresh_db(s).await;
    let c = db::connect(&s.url("127.0.0.1", &name, "sslmode=require"))
        .await
        .unwrap();
    assert!(encrypted(&c).await);
}

#[tokio::test]
async fn verify_full_connects_with_the_right_ca_by_name_and_by_address() {
    let s = TlsServer::get().await;
    let name = fresh_db(s).await;
    let ca = s.ca_file.display().to_string();
    for host in ["localhost", "127.0.0.1"] {
        let url = s.url(
            host,
            &name,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        );
        let c = db::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(encrypted(&c).await);
    }
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_authority_is_refused_with_the_cause() {
    let s = TlsServer::get().await;
    let other = s.other_ca_file.display().to_string();
    for mode in ["verify-full", "verify-ca", "require"] {
        let e = refused(&s.url(
            "127.0.0.1",
            "postgres",
            &format!("sslmode={mode}&sslrootcert={other}"),
        ))
        .await;
        assert!(
            e.contains("not signed by a trusted authority") && e.contains("OFFLOAD_DB_CA_FILE"),
            "{mode}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "one line: {e}");
    }
    // Without any CA file, the platform's roots do not know the test's CA.
    let e = refused(&s.url("localhost", "postgres", "sslmode=verify-full")).await;
    assert!(e.contains("not signed by a trusted authority"), "{e}");
}

#[tokio::test]
async fn a_host_the_certificate_does_not_name_is_refused_by_verify_full_only() {
    let s = TlsServer::get().await;
    let ca = s.ca_file.display().to_string();
    // 127.0.0.2 reaches the same server; the certificate names localhost
    // and 127.0.0.1 only.
    let e = refused(&s.url(
        "127.0.0.2",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(e.contains("does not name the host \"127.0.0.2\""), "{e}");
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    let c = db::connect(&s.url(
        "127.0.0.2",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-ca checks the chain, not the name");
    assert!(encrypted(&c).await);
}

#[tokio::test]
async fn clear_text_to_a_server_that_wants_tls_is_refused_with_the_cause() {
    let s = TlsServer::get().await;
    // Explicitly, and by default for a loopback host.
    for query in ["sslmode=disable", ""] {
        let e = refused(&s.url("127.0.0.1", "postgres", query)).await;
        assert!(
            e.contains("no encryption") && e.contains("accepts only encrypted connections"),
            "{query:?}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "one line: {e}");
    }
}

#[tokio::test]
async fn migrations_the_pool_and_the_listener_all_run_over_tls() {
    let s = TlsServer::get().await;
    let name = fresh_db(s).await;
    let url = s.url(
        "localhost",
        &name,
        &format!("sslmode=verify-full&sslrootcert={}", s.ca_file.display()),
    );
    assert!(!db::migrate(&url).await.unwrap().is_empty());
    let pool = db::pool(&url, 2).unwrap();
    db::check_schema(&pool).await.unwrap();
    let q = PgQueue::new(pool.clone(), 5);
    let listener = q.listen(&url);
    let conn = pool.get().await.unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let row = conn
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl), \
                   count(*) FILTER (WHERE a.query = 'LISTEN offload_queue' AND s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        let (tls, clear, listening): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(clear, 0, "a connection in clear text");
        if listening == 1 {
            assert!(tls >= 2, "the pool's and the listener's connections");
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the listener never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listener.abort();
}

#[tokio::test]
async fn the_ca_file_setting_reaches_every_connection_through_the_url() {
    let s = TlsServer::get().await;
    let name = fresh_db(s).await;
    let url = s.url("localhost", &name, "sslmode=verify-full");
    let ca = s.ca_file.display().to_string();
    let config = Config::from_lookup(|k| match k {
        "DATABASE_URL" => Some(url.clone()),
        "OFFLOAD_DB_CA_FILE" => Some(ca.clone()),
        _ => None,
    })
    .unwrap();
    assert!(config.database_url.contains("sslrootcert="));
    let c = db::connect(&config.database_url).await.unwrap();
    assert!(encrypted(&c).await);

    let e = Config::from_lookup(|k| match k {
        "DATABASE_URL" => Some(url.clone()),
        "OFFLOAD_DB_CA_FILE" => Some("/nonexistent/rds-global-bundle.pem".into()),
        _ => None,
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("OFFLOAD_DB_CA_FILE")
            && e.contains("cannot read the CA file /nonexistent/rds-global-bundle.pem"),
        "{e}"
    );
}
