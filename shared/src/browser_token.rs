//! Browser tokens (`ofb_…`): what a web app hands the page that shows a
//! job's progress, instead of the user's own token. One names a workspace,
//! the jobs (by id) or tags it opens, what it may do (`read`, and `cancel`
//! when granted) and when it expires (at most 24 h). It is signed by
//! Offload (HS256 under its own key, never the identity provider's), so a
//! request carrying one is verified without a database read.
//!
//! It opens `GET` of those jobs, their children, logs and stream, the
//! realtime channel for them, and their cancel when granted; nothing else.

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, LEEWAY_SECS};
use crate::ids::{JobId, WorkspaceId};
use crate::job::Job;

/// What every browser token starts with.
pub const PREFIX: &str = "ofb_";
/// The audience its claims carry, so no other token of the same key passes.
const AUDIENCE: &str = "offload-browser";
/// The longest a browser token lives.
pub const MAX_TTL_SECS: i64 = 24 * 3600;
/// Jobs and tags one token may name (it travels in a URL).
pub const MAX_JOBS: usize = 100;
pub const MAX_TAGS: usize = 20;

/// Whether a bearer token is a browser token.
pub fn is_browser_token(token: &str) -> bool {
    token.starts_with(PREFIX)
}

/// What a browser token may do besides reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Read,
    Cancel,
}

/// The claims of a browser token: what it opens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(rename = "ws")]
    pub workspace: WorkspaceId,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<Scope>,
    pub exp: i64,
    pub iat: i64,
    aud: String,
}

impl Grant {
    pub fn new(
        workspace: WorkspaceId,
        jobs: Vec<JobId>,
        tags: Vec<String>,
        scopes: Vec<Scope>,
        now: DateTime<Utc>,
        expires: DateTime<Utc>,
    ) -> Grant {
        Grant {
            workspace,
            jobs,
            tags,
            scopes,
            exp: expires.timestamp(),
            iat: now.timestamp(),
            aud: AUDIENCE.into(),
        }
    }

    /// Whether the token opens `job`: named by id, carrying one of its
    /// tags, or a child of a job it names; and not expired (a WebSocket
    /// opened with it stops receiving once it is).
    pub fn sees(&self, job: &Job) -> bool {
        self.exp + LEEWAY_SECS as i64 > Utc::now().timestamp()
            && job.workspace_id == self.workspace
            && (self.jobs.contains(&job.id)
                || job.parent_id.is_some_and(|p| self.jobs.contains(&p))
                || job.tags.iter().any(|t| self.tags.contains(t)))
    }

    pub fn may_cancel(&self) -> bool {
        self.scopes.contains(&Scope::Cancel)
    }
}

/// Signs and verifies browser tokens with Offload's own key
/// (`OFFLOAD_BROWSER_TOKEN_SECRET`, or its ARN; generated per process for
/// `offload dev`).
#[derive(Clone)]
pub struct BrowserKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for BrowserKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrowserKeys(…)")
    }
}

impl BrowserKeys {
    pub fn new(secret: &[u8]) -> BrowserKeys {
        BrowserKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// A key of 32 random bytes: tokens it signs die with the process.
    pub fn generated() -> BrowserKeys {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        BrowserKeys::new(&bytes)
    }

    pub fn sign(&self, grant: &Grant) -> String {
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), grant, &self.encoding)
            .expect("HS256 signing cannot fail");
        format!("{PREFIX}{jwt}")
    }

    /// The grant of a token this key signed, unexpired.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let jwt = token
            .strip_prefix(PREFIX)
            .ok_or_else(|| AuthError::Invalid("not a browser token".into()))?;
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = LEEWAY_SECS;
        v.set_audience(&[AUDIENCE]);
        v.set_required_spec_claims(&["exp", "aud"]);
        jsonwebtoken::decode::<Grant>(jwt, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => {
                    AuthError::Invalid("the browser token is not one this deployment signed".into())
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_with_its_key_only_and_not_once_tampered_or_expired() {
        let keys = BrowserKeys::generated();
        let now = Utc::now();
        let ws = WorkspaceId::new();
        let grant = Grant::new(
            ws,
            vec![JobId::new()],
            vec![],
            vec![Scope::Read],
            now,
            now + chrono::Duration::minutes(15),
        );
        let token = keys.sign(&grant);
        assert!(is_browser_token(&token));
        assert_eq!(keys.verify(&token).unwrap(), grant);
        assert!(BrowserKeys::generated().verify(&token).is_err());
        // Another job's id written into the claims: the signature fails.
        let mut parts: Vec<String> = token[PREFIX.len()..].split('.').map(String::from).collect();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
        claims["jobs"] = serde_json::json!([JobId::new()]);
        parts[1] = b64.encode(claims.to_string());
        assert!(keys
            .verify(&format!("{PREFIX}{}", parts.join(".")))
            .is_err());
        let old = Grant::new(
            ws,
            vec![],
            vec!["a".into()],
            vec![],
            now - chrono::Duration::hours(2),
            now - chrono::Duration::hours(1),
        );
        assert_eq!(keys.verify(&keys.sign(&old)), Err(AuthError::Expired));
    }
}
