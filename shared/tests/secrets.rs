//! Secrets by ARN from Secrets Manager (moto's server), read at start and
//! read again when the database refuses a rotated password.

use std::time::Duration;

use offload::config::Config;
use offload::handlers::Registry;
use offload::startup::Services;
use offload::testing::{sqs_endpoint, TestDb};
use serde_json::json;

/// `url` with its user and password replaced.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (_, host) = rest.split_once('@').unwrap();
    format!("{scheme}://{user}:{password}@{host}")
}

async fn secrets() -> aws_sdk_secretsmanager::Client {
    offload::secrets::client("us-east-1", Some(&sqs_endpoint())).await
}

async fn create_secret(
    client: &aws_sdk_secretsmanager::Client,
    value: serde_json::Value,
) -> String {
    client
        .create_secret()
        .name(format!("offload-test-{}", uuid::Uuid::new_v4().simple()))
        .secret_string(value.to_string())
        .send()
        .await
        .unwrap()
        .arn()
        .unwrap()
        .to_string()
}

fn config_from(vars: Vec<(&'static str, String)>) -> Config {
    Config::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())).unwrap()
}

async fn current_user(services: &Services) -> String {
    services
        .store
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_function_starts_from_arns_and_survives_a_password_rotation() {
    let db = TestDb::new().await;
    let role = format!("rot_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin = db.pool.get().await.unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'first-password'; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
        ))
        .await
        .unwrap();
    let client = secrets().await;
    let db_arn = create_secret(
        &client,
        json!({"url": as_user(&db.url, &role, "first-password"), "engine": "postgres"}),
    )
    .await;
    let token_secret = "t".repeat(40);
    let jwt_arn = create_secret(&client, json!({"secret": token_secret})).await;

    // Only ARNs: no DATABASE_URL, no OFFLOAD_JWT_SECRET.
    let config = config_from(vec![
        ("OFFLOAD_DATABASE_SECRET_ARN", db_arn.clone()),
        ("OFFLOAD_JWT_SECRET_ARN", jwt_arn),
        ("OFFLOAD_SECRETS_ENDPOINT", sqs_endpoint()),
    ]);
    assert!(config.database_url.is_empty());
    let services = Services::connect(config, Registry::builtin())
        .await
        .expect("start from the secrets");
    assert_eq!(services.config.jwt_secret, Some(token_secret));
    assert!(!services.config.jwt_secret_is_default);
    assert_eq!(current_user(&services).await, role);

    // The secret rotates: the role's password changes, the secret follows,
    // and the server drops the sessions that used the old one.
    admin
        .batch_execute(&format!("ALTER ROLE {role} PASSWORD 'second-password'"))
        .await
        .unwrap();
    client
        .put_secret_value()
        .secret_id(&db_arn)
        .secret_string(json!({"url": as_user(&db.url, &role, "second-password")}).to_string())
        .send()
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The next call opens a connection with the old password, is refused,
    // reads the secret again and succeeds: no restart.
    assert_eq!(current_user(&services).await, role);
    services.store.pool().close();
    let _ = admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_stops_the_start_with_its_name() {
    let client = secrets().await;
    let missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:offload-nope-AbCdEf";
    let config = config_from(vec![
        ("OFFLOAD_DATABASE_SECRET_ARN", missing.into()),
        ("OFFLOAD_SECRETS_ENDPOINT", sqs_endpoint()),
    ]);
    let e = Services::connect(config, Registry::builtin())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.starts_with(&format!(
            "OFFLOAD_DATABASE_SECRET_ARN: cannot read the secret {missing}"
        )),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");

    // A secret without the key it should hold.
    let arn = create_secret(&client, json!({"password": "x"})).await;
    let config = config_from(vec![
        ("OFFLOAD_DATABASE_SECRET_ARN", arn),
        ("OFFLOAD_SECRETS_ENDPOINT", sqs_endpoint()),
    ]);
    let e = Services::connect(config, Registry::builtin())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("its JSON has no string under the key \"url\""),
        "{e}"
    );
}
