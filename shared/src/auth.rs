//! Bearer tokens: HS256 JWTs signed with the configured secret (the form
//! Supabase and most web apps issue), `sub` naming the user and `exp`
//! enforced. Behind API Gateway's JWT authorizer the gateway has already
//! verified the token and its claims arrive with the request instead.

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::UserId;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id (a UUID).
    pub sub: String,
    pub exp: i64,
    pub iat: i64,
    /// The audience Supabase uses; not checked, carried for compatibility.
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

/// Claims that API Gateway's JWT authorizer verified; the api function puts
/// them in the request's extensions. Clients cannot set them.
#[derive(Clone, Debug)]
pub struct GatewayClaims {
    pub sub: String,
}

/// Signing and verification keys made once from the secret.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Keys {
    pub fn new(secret: &str) -> Self {
        Keys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// A token for `user` valid until `expires`.
    pub fn issue(&self, user: UserId, now: DateTime<Utc>, expires: DateTime<Utc>) -> String {
        let claims = Claims {
            sub: user.to_string(),
            exp: expires.timestamp(),
            iat: now.timestamp(),
            role: Some("authenticated".into()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Verifies a token (HS256 only: `none` and other algorithms are
    /// refused) and returns its user.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        user_from_sub(&data.claims.sub)
    }
}

/// The user named by a `sub` claim.
pub fn user_from_sub(sub: &str) -> Result<UserId, AuthError> {
    sub.parse()
        .map_err(|_| AuthError::Invalid(format!("`sub` must be a user id (UUID), got {sub:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn issued_tokens_verify_and_expired_or_forged_ones_do_not() {
        let keys = Keys::new("a-secret-that-is-long-enough-for-hs256!");
        let user = UserId::new();
        let now = Utc::now();
        let t = keys.issue(user, now, now + Duration::hours(1));
        assert_eq!(keys.verify(&t), Ok(user));

        let old = keys.issue(user, now - Duration::hours(2), now - Duration::hours(1));
        assert_eq!(keys.verify(&old), Err(AuthError::Expired));

        let other = Keys::new("another-secret-that-is-long-enough-for-it");
        assert!(matches!(other.verify(&t), Err(AuthError::Invalid(_))));

        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let payload = t.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(matches!(keys.verify(&none), Err(AuthError::Invalid(_))));
    }
}
