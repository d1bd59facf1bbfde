//! Token verification against an identity provider's key set: an
//! in-process JWKS server (and OIDC discovery document) with keys the test
//! generates, and the API answering with them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use offload::auth::{AuthError, Verifier};
use offload::config::Config;
use offload::ids::UserId;
use offload::testing::{expect_problem, TestApp, TestDb};
use offload::workspace::Tier;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key the test made, with its public half as a JWK.
struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key as the JWKS publishes it, PEM: what an attacker has.
    public_pem: String,
}

impl TestKey {
    fn rsa(kid: &str) -> TestKey {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        use rsa::traits::PublicKeyParts;
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let public = private.to_public_key();
        TestKey {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes()),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                        "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}),
            public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
        }
    }

    fn ec(kid: &str) -> TestKey {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let secret = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
        let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
            &secret.public_key(),
            false,
        );
        TestKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(secret.to_pkcs8_der().unwrap().as_bytes()),
            jwk: json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
                        "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
            public_pem: secret
                .public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// RSA key generation is slow; every test shares one key.
fn rsa_key() -> &'static TestKey {
    static KEY: std::sync::OnceLock<TestKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| TestKey::rsa("rsa-1"))
}

const ISSUER_PATH: &str = "/auth/v1";
const AUDIENCE: &str = "authenticated";

/// The identity provider: a discovery document and the key set it names,
/// which the test can change or take down, counting fetches of the set.
struct Provider {
    issuer: String,
    jwks: Arc<Mutex<Value>>,
    up: Arc<std::sync::atomic::AtomicBool>,
    fetches: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Provider {
    async fn serve(keys: &[&TestKey]) -> Provider {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let issuer = format!("{base}{ISSUER_PATH}");
        let jwks = Arc::new(Mutex::new(
            json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}),
        ));
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let fetches = Arc::new(AtomicUsize::new(0));
        let discovery =
            json!({"issuer": issuer, "jwks_uri": format!("{issuer}/.well-known/jwks.json")});
        let (set, alive, count) = (jwks.clone(), up.clone(), fetches.clone());
        let app = axum::Router::new()
            .route(
                &format!("{ISSUER_PATH}/.well-known/openid-configuration"),
                get(move || async move { axum::Json(discovery) }),
            )
            .route(
                &format!("{ISSUER_PATH}/.well-known/jwks.json"),
                get(move || {
                    let (set, alive, count) = (set.clone(), alive.clone(), count.clone());
                    async move {
                        if !alive.load(Ordering::SeqCst) {
                            return Err(axum::http::StatusCode::SERVICE_UNAVAILABLE);
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        Ok(axum::Json(set.lock().unwrap().clone()))
                    }
                }),
            );
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Provider {
            issuer,
            jwks,
            up,
            fetches,
            server,
        }
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.jwks.lock().unwrap() =
            json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    }

    fn config(&self, secret: Option<&str>) -> Config {
        Config {
            jwt_issuer: Some(self.issuer.clone()),
            jwt_audience: vec![AUDIENCE.into()],
            jwks_url: None,
            jwt_secret: secret.map(Into::into),
            ..Config::defaults()
        }
    }

    /// Verifies with the issuer's keys (found by discovery), no shared secret.
    fn verifier(&self) -> Verifier {
        Verifier::from_config(&self.config(None)).unwrap()
    }

    fn claims(&self, user: UserId) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({"sub": user.to_string(), "iss": self.issuer, "aud": AUDIENCE,
               "iat": now, "exp": now + 3600})
    }
}

/// The user a token names, its subject being a UUID in these tests.
trait VerifyUser {
    async fn verify_user(&self, token: &str) -> Result<UserId, AuthError>;
}

impl VerifyUser for Verifier {
    async fn verify_user(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify(token)
            .await
            .map(|i| i.subject.parse().expect("these tests' subjects are UUIDs"))
    }
}

fn invalid(r: Result<UserId, AuthError>, says: &str) {
    match r {
        Err(AuthError::Invalid(m)) => assert!(m.contains(says), "{m:?} should say {says:?}"),
        other => panic!("expected a refusal saying {says:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn rs256_and_es256_tokens_from_the_issuers_key_set_are_accepted() {
    let ec = TestKey::ec("ec-1");
    let idp = Provider::serve(&[rsa_key(), &ec]).await;
    let v = idp.verifier();
    let user = UserId::new();
    assert_eq!(
        v.verify_user(&rsa_key().sign(&idp.claims(user))).await,
        Ok(user)
    );
    assert_eq!(v.verify_user(&ec.sign(&idp.claims(user))).await, Ok(user));
    assert_eq!(
        idp.fetches.load(Ordering::SeqCst),
        1,
        "the set is fetched once and cached"
    );
}

#[tokio::test]
async fn a_key_published_after_rotation_is_fetched_and_accepted() {
    let (old, new) = (TestKey::ec("2026-11"), TestKey::ec("2026-12"));
    let idp = Provider::serve(&[&old]).await;
    let user = UserId::new();
    let v = idp.verifier();
    // A verifier that may fetch again at once, as one does a minute later.
    let fast = idp.verifier().refetching_after(Duration::ZERO);
    assert_eq!(v.verify_user(&old.sign(&idp.claims(user))).await, Ok(user));
    assert_eq!(
        fast.verify_user(&old.sign(&idp.claims(user))).await,
        Ok(user)
    );

    // The provider rotates: tokens signed with the new key arrive at once.
    idp.publish(&[&old, &new]);
    let rotated = new.sign(&idp.claims(user));
    assert_eq!(fast.verify_user(&rotated).await, Ok(user));
    assert_eq!(
        fast.verify_user(&old.sign(&idp.claims(user))).await,
        Ok(user)
    );

    // With the default of one fetch a minute, an unknown kid just after a
    // fetch is refused without asking again: a flood of made-up kids cannot
    // turn into a flood of requests to the provider.
    let before = idp.fetches.load(Ordering::SeqCst);
    for _ in 0..5 {
        invalid(
            v.verify_user(&rotated).await,
            "\"2026-12\" is not in the issuer's key set",
        );
    }
    assert_eq!(idp.fetches.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn wrong_issuer_audience_times_and_kids_are_refused_by_name() {
    let idp = Provider::serve(&[rsa_key()]).await;
    let v = idp.verifier();
    let user = UserId::new();
    let key = rsa_key();
    let now = chrono::Utc::now().timestamp();
    let with = |k: &str, val: Value| {
        let mut c = idp.claims(user);
        c[k] = val;
        key.sign(&c)
    };
    invalid(
        v.verify_user(&with("iss", json!("https://evil.example/auth/v1")))
            .await,
        "issuer (iss)",
    );
    invalid(
        v.verify_user(&with("aud", json!("service_role"))).await,
        "audience (aud)",
    );
    assert_eq!(
        v.verify_user(&with("exp", json!(now - 120))).await,
        Err(AuthError::Expired)
    );
    // Within the leeway, a clock a few seconds apart is no reason to refuse.
    assert_eq!(v.verify_user(&with("exp", json!(now - 5))).await, Ok(user));
    invalid(
        v.verify_user(&with("nbf", json!(now + 600))).await,
        "not valid yet",
    );
    let mut no_aud = idp.claims(user);
    no_aud.as_object_mut().unwrap().remove("aud");
    invalid(v.verify_user(&key.sign(&no_aud)).await, "no `aud` claim");

    let stranger = TestKey::ec("not-published");
    invalid(
        v.verify_user(&stranger.sign(&idp.claims(user))).await,
        "\"not-published\" is not in the issuer's key set",
    );
    // A published kid with another key's signature.
    let forged = TestKey {
        kid: key.kid.clone(),
        ..TestKey::ec("x")
    };
    invalid(
        v.verify_user(&forged.sign(&idp.claims(user))).await,
        "RS256",
    );
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    let idp = Provider::serve(&[rsa_key()]).await;
    let user = UserId::new();
    let claims = idp.claims(user);
    // The classic confusion: the public key, which anyone can fetch, used
    // as an HMAC secret.
    let forge = |pem: &str| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(rsa_key().kid.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(pem.as_bytes())).unwrap()
    };
    let token = forge(&rsa_key().public_pem);
    // No shared secret configured: HS256 is not accepted at all.
    invalid(
        idp.verifier().verify_user(&token).await,
        "HS256 tokens are not accepted",
    );
    // With one (Supabase's legacy secret beside its new keys), HS256 is
    // checked against that secret, never against a key of the set.
    let both =
        Verifier::from_config(&idp.config(Some("the-projects-legacy-secret-32-characters!")))
            .unwrap();
    invalid(both.verify_user(&token).await, "signature");
    let ec = TestKey::ec("ec-confusion");
    invalid(both.verify_user(&forge(&ec.public_pem)).await, "signature");
}

#[tokio::test]
async fn with_the_key_set_unreachable_known_keys_verify_and_unknown_ones_are_401() {
    let db = TestDb::new().await;
    let idp = Provider::serve(&[rsa_key()]).await;
    let verifier = idp.verifier().refetching_after(Duration::ZERO);
    let queue: Arc<dyn offload::queue::Queue> = Arc::new(db.pg_queue(5));
    let app = TestApp::spawn_state(db, queue, Tier::Standard, |s| s.auth = verifier).await;
    let get = |token: String| app.client.get(app.jobs_url()).bearer_auth(token).send();
    let known = rsa_key().sign(&idp.claims(app.user));
    assert_eq!(get(known.clone()).await.unwrap().status(), StatusCode::OK);

    idp.up.store(false, Ordering::SeqCst);
    assert_eq!(
        get(known).await.unwrap().status(),
        StatusCode::OK,
        "cached keys go on verifying while the provider is down"
    );
    let unknown = TestKey::ec("new-while-down").sign(&idp.claims(app.user));
    let body = expect_problem(get(unknown).await.unwrap(), StatusCode::UNAUTHORIZED).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("could not be fetched") && detail.contains("503"),
        "{detail}"
    );

    // A token of the provider for someone who is not a member: 404, as for
    // any non-member.
    let outsider = rsa_key().sign(&idp.claims(UserId::new()));
    expect_problem(get(outsider).await.unwrap(), StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn an_explicit_jwks_url_is_used_without_discovery() {
    let idp = Provider::serve(&[rsa_key()]).await;
    let config = Config {
        jwks_url: Some(format!("{}/.well-known/jwks.json", idp.issuer)),
        jwt_issuer: None,
        jwt_audience: Vec::new(),
        jwt_secret: None,
        ..Config::defaults()
    };
    let v = Verifier::from_config(&config).unwrap();
    let user = UserId::new();
    assert_eq!(
        v.verify_user(&rsa_key().sign(&idp.claims(user))).await,
        Ok(user)
    );
}

#[tokio::test]
async fn a_member_provisioned_by_subject_opens_the_workspace_with_the_providers_token() {
    let db = TestDb::new().await;
    let (_, platform_key) = {
        let conn = db.pool.get().await.unwrap();
        offload::platform::create_key(&**conn, "acme web app")
            .await
            .unwrap()
    };
    let idp = Provider::serve(&[rsa_key()]).await;
    let verifier = idp.verifier();
    let queue: Arc<dyn offload::queue::Queue> = Arc::new(db.pg_queue(5));
    let app = TestApp::spawn_state(db, queue, Tier::Standard, |s| s.auth = verifier).await;
    let ws: Value = app
        .client
        .post(format!("{}/api/workspaces", app.base))
        .bearer_auth(&platform_key)
        .json(&json!({"name": "Acme", "external_id": "org_acme"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ws = ws["id"].as_str().unwrap().to_string();
    let subject = "auth0|65f0c2b9e4a1d2c3b4a5f6e7";
    let added = app
        .client
        .post(format!("{}/api/workspaces/{ws}/members", app.base))
        .bearer_auth(&platform_key)
        .json(&json!({"subject": subject, "issuer": idp.issuer, "role": "member"}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::CREATED);
    let member: Value = added.json().await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let token = rsa_key().sign(&json!({"sub": subject, "iss": idp.issuer, "aud": AUDIENCE,
                                       "iat": now, "exp": now + 3600}));
    let jobs = format!("{}/api/workspaces/{ws}/jobs", app.base);
    let resp = app
        .client
        .get(&jobs)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let removed = app
        .client
        .delete(format!(
            "{}/api/workspaces/{ws}/members/{}",
            app.base,
            member["id"].as_str().unwrap()
        ))
        .bearer_auth(&platform_key)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    let resp = app
        .client
        .get(&jobs)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_problem(resp, StatusCode::NOT_FOUND).await;
}
