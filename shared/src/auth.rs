//! Bearer tokens. Identity providers (Supabase's signing keys, Auth0,
//! Clerk, Cognito) sign with RS/ES keys they publish as a JWKS: those are
//! verified against the set, fetched from `OFFLOAD_JWKS_URL` or found
//! through the issuer's OIDC discovery document, cached, and fetched again
//! when a token names a key the set does not hold (at most once a minute).
//! HS256 tokens are accepted only when a shared secret is configured (local
//! use, `offload token`, Supabase's legacy secret). A token's `alg` must be
//! one its key can verify; `exp` and `sub` are required, `nbf` is honoured,
//! and `iss`/`aud` are checked when configured. What a verified token names
//! is an [`Identity`]: its issuer and subject exactly as the provider wrote
//! them (`auth0|65f…`, `user_2ab…`, a Firebase id, a UUID).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{Config, ConfigError};
use crate::ids::UserId;

/// Seconds of clock difference tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// A token naming an unknown key fetches the set again at most this often.
const REFETCH_AFTER: Duration = Duration::from_secs(60);
/// A set this old is fetched again on the next request (keys the issuer
/// withdrew stop working within this time); if that fails the cached set
/// goes on verifying.
const REFRESH_AFTER: Duration = Duration::from_secs(3600);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The algorithms verified with a key from the set.
const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user, as the identity provider names them.
    pub sub: String,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// The role Supabase puts in its tokens; carried for compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

#[derive(Debug, Error, PartialEq)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// Signs HS256 tokens with the shared secret: `offload token`, `offload
/// dev`'s banner, tests. With an issuer or audience configured, tokens carry
/// them, so they pass the same checks as the identity provider's.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Keys {
    pub fn new(secret: &str) -> Self {
        Keys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            issuer: None,
            audience: None,
        }
    }

    /// The signing keys of `config`'s secret, with its issuer and first
    /// audience; `None` without a secret.
    pub fn from_config(config: &Config) -> Option<Self> {
        let secret = config.jwt_secret.as_deref()?;
        Some(Keys {
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.first().cloned(),
            ..Keys::new(secret)
        })
    }

    /// A token for `user` (its id as the subject) valid until `expires`.
    pub fn issue(&self, user: UserId, now: DateTime<Utc>, expires: DateTime<Utc>) -> String {
        self.issue_for(&user.to_string(), now, expires)
    }

    /// A token whose subject is `subject`, valid until `expires`.
    pub fn issue_for(&self, subject: &str, now: DateTime<Utc>, expires: DateTime<Utc>) -> String {
        let claims = Claims {
            sub: subject.to_string(),
            exp: expires.timestamp(),
            iat: now.timestamp(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            role: Some("authenticated".into()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }
}

/// How tokens are verified: made once at start, shared by every request.
#[derive(Clone)]
pub struct Verifier(Arc<Inner>);

struct Inner {
    secret: Option<DecodingKey>,
    issuer: Option<String>,
    audience: Vec<String>,
    jwks: Option<Jwks>,
}

/// Where the key set comes from.
#[derive(Clone, Debug)]
enum JwksSource {
    Url(String),
    /// The `jwks_uri` of `{issuer}/.well-known/openid-configuration`.
    Discover(String),
}

struct Jwks {
    source: JwksSource,
    refetch_after: Duration,
    http: reqwest::Client,
    cache: RwLock<Cached>,
    /// One fetch at a time; requests with a known key never wait for it.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cached {
    keys: HashMap<String, Arc<SetKey>>,
    /// Keys without a `kid`, tried when a token names none.
    unnamed: Vec<Arc<SetKey>>,
    fetched: Option<Instant>,
    tried: Option<Instant>,
}

struct SetKey {
    key: DecodingKey,
    /// The `alg` the set declares for the key, when it does.
    alg: Option<Algorithm>,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

/// Only what the API needs from a verified token; the rest is checked by
/// the validation.
#[derive(Deserialize)]
struct Subject {
    sub: String,
    #[serde(default)]
    iss: Option<String>,
}

/// The longest issuer or subject a member can have.
pub const MAX_IDENTITY_CHARS: usize = 255;

/// Who a verified token names: the user `subject` of `issuer` (absent when
/// the token carries no `iss`). The same subject under two issuers is two
/// users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub issuer: Option<String>,
    pub subject: String,
}

impl Verifier {
    /// The verification `config` describes. Outside Lambda, no setting at
    /// all means the development secret (with a warning at start); inside
    /// it, no setting is an error, so a deployed API never accepts tokens
    /// signed with a public secret.
    pub fn from_config(config: &Config) -> Result<Verifier, ConfigError> {
        let source = match (&config.jwks_url, &config.jwt_issuer) {
            (Some(url), _) => Some(JwksSource::Url(url.clone())),
            (None, Some(iss)) => Some(JwksSource::Discover(iss.clone())),
            (None, None) => None,
        };
        config.require_token_verification()?;
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| ConfigError {
                variable: "OFFLOAD_JWKS_URL",
                reason: format!("no HTTP client: {e}"),
            })?;
        Ok(Verifier(Arc::new(Inner {
            secret: config
                .jwt_secret
                .as_deref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            jwks: source.map(|source| Jwks {
                source,
                refetch_after: REFETCH_AFTER,
                http,
                cache: RwLock::default(),
                fetching: tokio::sync::Mutex::new(()),
            }),
        })))
    }

    /// HS256 with `secret` alone, no issuer or audience: tests and tools.
    pub fn secret(secret: &str) -> Verifier {
        let config = Config {
            jwt_secret: Some(secret.into()),
            jwt_issuer: None,
            jwks_url: None,
            jwt_audience: Vec::new(),
            ..Config::defaults()
        };
        Verifier::from_config(&config).expect("a secret is a verification setting")
    }

    /// The same verifier, fetching the key set again for an unknown key
    /// after `every` instead of a minute (tests of rotation). Only before
    /// the verifier is shared.
    pub fn refetching_after(mut self, every: Duration) -> Verifier {
        if let Some(jwks) = Arc::get_mut(&mut self.0).and_then(|i| i.jwks.as_mut()) {
            jwks.refetch_after = every;
        }
        self
    }

    /// Verifies a token and returns whom it names.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("unreadable header: {e}")))?;
        let inner = &self.0;
        let sub = if header.alg == Algorithm::HS256 {
            let key = inner.secret.as_ref().ok_or_else(|| {
                AuthError::Invalid(
                    "HS256 tokens are not accepted here: no shared secret is configured".into(),
                )
            })?;
            self.decode(token, key, Algorithm::HS256)?
        } else if ASYMMETRIC.contains(&header.alg) {
            let jwks = inner.jwks.as_ref().ok_or_else(|| {
                AuthError::Invalid(format!(
                    "{:?} tokens are not accepted here: no key set (OFFLOAD_JWT_ISSUER or \
                     OFFLOAD_JWKS_URL) is configured",
                    header.alg
                ))
            })?;
            let key = jwks.key(header.kid.as_deref(), header.alg).await?;
            if key.alg.is_some_and(|a| a != header.alg) {
                return Err(AuthError::Invalid(format!(
                    "the token says {:?} but its key is for {:?}",
                    header.alg,
                    key.alg.unwrap_or(header.alg)
                )));
            }
            self.decode(token, &key.key, header.alg)?
        } else {
            return Err(AuthError::Invalid(format!(
                "the algorithm {:?} is not accepted",
                header.alg
            )));
        };
        identity(sub)
    }

    fn decode(&self, token: &str, key: &DecodingKey, alg: Algorithm) -> Result<Subject, AuthError> {
        let inner = &self.0;
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &inner.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        if inner.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&inner.audience);
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        jsonwebtoken::decode::<Subject>(token, key, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("the token is not valid yet (nbf)".into())
                }
                ErrorKind::InvalidIssuer => AuthError::Invalid(format!(
                    "the token's issuer (iss) is not {}",
                    inner.issuer.as_deref().unwrap_or_default()
                )),
                ErrorKind::InvalidAudience => AuthError::Invalid(format!(
                    "the token's audience (aud) is not {}",
                    inner.audience.join(" or ")
                )),
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("the token has no `{c}` claim"))
                }
                ErrorKind::InvalidSignature => {
                    AuthError::Invalid("the signature does not verify".into())
                }
                ErrorKind::InvalidAlgorithm => AuthError::Invalid(format!(
                    "the token's algorithm {alg:?} does not fit its key"
                )),
                _ => AuthError::Invalid(e.to_string()),
            })
    }
}

impl Jwks {
    /// The key a token names (`kid`), from the cache or from a fresh fetch
    /// when the cache lacks it (or is old); with the issuer unreachable,
    /// the cached keys go on verifying.
    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<SetKey>, AuthError> {
        let stale = self.lookup(kid, alg);
        let (found, age) = stale;
        let fetch_for_missing = found.is_none() && self.may_try();
        let fetch_for_age = found.is_some() && age.is_none_or(|a| a > REFRESH_AFTER);
        if fetch_for_age {
            // One request refreshes; the others use the cached key.
            if let Ok(_guard) = self.fetching.try_lock() {
                if self.may_try() {
                    if let Err(e) = self.fetch().await {
                        tracing::warn!(error = %e, "the key set could not be refreshed; the cached keys go on verifying");
                    }
                }
            }
        }
        if let Some(key) = found {
            return Ok(key);
        }
        let mut fetch_error = None;
        if fetch_for_missing {
            let _guard = self.fetching.lock().await;
            if let (Some(key), _) = self.lookup(kid, alg) {
                return Ok(key);
            }
            if self.may_try() {
                if let Err(e) = self.fetch().await {
                    tracing::warn!(error = %e, "the key set could not be fetched");
                    fetch_error = Some(e);
                }
            }
        }
        if let (Some(key), _) = self.lookup(kid, alg) {
            return Ok(key);
        }
        let named = match kid {
            Some(k) => format!("the signing key {k:?} is not in the issuer's key set"),
            None => format!("the token names no key (kid) and the key set has none for {alg:?}"),
        };
        Err(AuthError::Invalid(match fetch_error {
            Some(e) => format!("{named}, and the key set could not be fetched: {e}"),
            None => named,
        }))
    }

    /// The cached key for `kid` (or, with no `kid`, the one unnamed key
    /// that fits `alg`), and the cache's age.
    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> (Option<Arc<SetKey>>, Option<Duration>) {
        let c = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let key = match kid {
            Some(k) => c.keys.get(k).cloned(),
            None => {
                let mut fits = c.unnamed.iter().filter(|k| k.alg.is_none_or(|a| a == alg));
                match (fits.next(), fits.next()) {
                    (Some(k), None) => Some(k.clone()),
                    _ => None,
                }
            }
        };
        (key, c.fetched.map(|f| f.elapsed()))
    }

    fn may_try(&self) -> bool {
        let c = self.cache.read().unwrap_or_else(|e| e.into_inner());
        c.tried.is_none_or(|t| t.elapsed() >= self.refetch_after)
    }

    /// Fetches the key set again. The error names the URLs it read, which
    /// reach an unauthenticated caller's 401 and the log: without their
    /// credentials or query strings.
    async fn fetch(&self) -> Result<(), String> {
        self.fetch_set()
            .await
            .map_err(|e| crate::redact::text(&e).into_owned())
    }

    async fn fetch_set(&self) -> Result<(), String> {
        self.cache.write().unwrap_or_else(|e| e.into_inner()).tried = Some(Instant::now());
        let url = match &self.source {
            JwksSource::Url(u) => u.clone(),
            JwksSource::Discover(issuer) => {
                let doc = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let d: Discovery = serde_json::from_slice(&self.get(&doc).await?)
                    .map_err(|e| format!("{doc}: not an OIDC discovery document: {e}"))?;
                d.jwks_uri
            }
        };
        let set: JwkSet = serde_json::from_slice(&self.get(&url).await?)
            .map_err(|e| format!("{url}: not a JWKS: {e}"))?;
        let mut fresh = Cached {
            fetched: Some(Instant::now()),
            tried: Some(Instant::now()),
            ..Cached::default()
        };
        for jwk in &set.keys {
            let Some(key) = set_key(jwk) else { continue };
            match &jwk.common.key_id {
                Some(kid) => {
                    fresh.keys.insert(kid.clone(), Arc::new(key));
                }
                None => fresh.unnamed.push(Arc::new(key)),
            }
        }
        if fresh.keys.is_empty() && fresh.unnamed.is_empty() {
            return Err(format!("{url}: the key set holds no usable signing key"));
        }
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(format!("{url}: larger than {MAX_JWKS_BYTES} bytes"));
            }
        }
        Ok(body)
    }
}

/// A signing key of the set; encryption keys, symmetric keys and keys of
/// an unknown kind are left out.
fn set_key(jwk: &Jwk) -> Option<SetKey> {
    use jsonwebtoken::jwk::{AlgorithmParameters, PublicKeyUse};
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption))
        || matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_))
    {
        return None;
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => match format!("{ka:?}").parse::<Algorithm>() {
            Ok(a) if ASYMMETRIC.contains(&a) => Some(a),
            _ => return None,
        },
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(SetKey { key, alg })
}

/// The user named by a `sub` claim.
/// The identity of verified claims: any subject of 1 to 255 characters
/// (the issuer likewise, when there is one).
fn identity(claims: Subject) -> Result<Identity, AuthError> {
    let fits =
        |s: &str| !s.is_empty() && s.chars().count() <= MAX_IDENTITY_CHARS && !s.contains('\0');
    if !fits(&claims.sub) {
        return Err(AuthError::Invalid(format!(
            "`sub` must be 1 to {MAX_IDENTITY_CHARS} characters"
        )));
    }
    let issuer = claims.iss.filter(|i| !i.is_empty());
    if issuer.as_deref().is_some_and(|i| !fits(i)) {
        return Err(AuthError::Invalid(format!(
            "`iss` must be 1 to {MAX_IDENTITY_CHARS} characters"
        )));
    }
    Ok(Identity {
        issuer,
        subject: claims.sub,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[tokio::test]
    async fn issued_tokens_verify_and_expired_or_forged_ones_do_not() {
        let secret = "a-secret-that-is-long-enough-for-hs256!";
        let (keys, verifier) = (Keys::new(secret), Verifier::secret(secret));
        let user = UserId::new();
        let now = Utc::now();
        let t = keys.issue(user, now, now + Duration::hours(1));
        assert_eq!(
            verifier.verify(&t).await.map(|i| i.subject),
            Ok(user.to_string())
        );

        let old = keys.issue(user, now - Duration::hours(2), now - Duration::hours(1));
        assert_eq!(verifier.verify(&old).await, Err(AuthError::Expired));

        let other = Verifier::secret("another-secret-that-is-long-enough-for-it");
        assert!(matches!(
            other.verify(&t).await,
            Err(AuthError::Invalid(m)) if m.contains("signature")
        ));

        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let payload = t.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(matches!(
            verifier.verify(&none).await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn an_asymmetric_token_without_a_key_set_is_refused_by_name() {
        let verifier = Verifier::secret("a-secret-that-is-long-enough-for-hs256!");
        // {"alg":"RS256","kid":"k1"} . {} . (any signature)
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.e30.c2ln";
        let err = verifier.verify(token).await.unwrap_err();
        assert!(
            matches!(&err, AuthError::Invalid(m) if m.contains("no key set")),
            "{err}"
        );
    }
}
