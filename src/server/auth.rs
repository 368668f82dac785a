//! Authentication of API callers: `authorization: Bearer <JWT>` on gRPC and REST alike.
//!
//! With `auth.mode: jwt` the token must verify with the configured HS256 secret or RS256
//! public key, and `exp` and `nbf` are enforced; `sub` is the caller's user id and
//! `role: admin` lets them see every instance. A missing or bad token is answered
//! `UNAUTHENTICATED` without saying why (the cause is logged at debug level only).
//! With `auth.mode: none` every caller is `anonymous` and an admin.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::{biz, conf};

/// The user id of callers when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// Who a verified caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub user_id: String,
    /// `role: admin`.
    pub admin: bool,
}

/// Verifies bearer tokens, or lets everyone in when authentication is off.
pub struct Authenticator {
    verifier: Option<(DecodingKey, Validation)>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    role: Option<String>,
}

impl Authenticator {
    /// Everyone is `anonymous` and an admin.
    pub fn none() -> Self {
        Self { verifier: None }
    }

    /// Whether callers must present a token.
    pub fn required(&self) -> bool {
        self.verifier.is_some()
    }

    /// From `auth`, reading the secret or public key file it names.
    ///
    /// # Errors
    /// A key file cannot be read or parsed, or the algorithm is not HS256 or RS256.
    pub fn from_conf(auth: &conf::Auth) -> Result<Self, String> {
        if auth.mode == conf::AuthMode::None {
            return Ok(Self::none());
        }
        let jwt = &auth.jwt;
        let (key, algorithm) = match jwt.algorithm.as_str() {
            "HS256" => {
                let secret = if jwt.secret_file.is_empty() {
                    jwt.secret.expose_secret().as_bytes().to_vec()
                } else {
                    let raw = std::fs::read(&jwt.secret_file)
                        .map_err(|e| format!("auth.jwt.secret_file {:?}: {e}", jwt.secret_file))?;
                    raw.trim_ascii().to_vec()
                };
                if secret.is_empty() {
                    return Err("auth.jwt: HS256 needs a secret (RESOURCE_AUTH__JWT__SECRET or auth.jwt.secret_file)".into());
                }
                (DecodingKey::from_secret(&secret), Algorithm::HS256)
            }
            "RS256" => {
                let pem = std::fs::read(&jwt.public_key_file).map_err(|e| {
                    format!("auth.jwt.public_key_file {:?}: {e}", jwt.public_key_file)
                })?;
                let key = DecodingKey::from_rsa_pem(&pem)
                    .map_err(|e| format!("auth.jwt.public_key_file: not an RSA public key: {e}"))?;
                (key, Algorithm::RS256)
            }
            other => return Err(format!("auth.jwt.algorithm {other:?}: expected HS256 or RS256")),
        };
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = jwt.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self { verifier: Some((key, validation)) })
    }

    /// The caller behind an `authorization` header value.
    ///
    /// # Errors
    /// `Unauthenticated` when the header is missing, is not a bearer token, or the token
    /// does not verify; the reason is logged at debug level, never answered.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, biz::Error> {
        let Some((key, validation)) = &self.verifier else {
            return Ok(Principal { user_id: ANONYMOUS.into(), admin: true });
        };
        let token = authorization
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or(biz::Error::Unauthenticated)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| {
                tracing::debug!(error = %e, "bearer token refused");
                biz::Error::Unauthenticated
            })?
            .claims;
        if claims.sub.is_empty() || biz::instance::validate_text("sub", &claims.sub).is_err() {
            tracing::debug!("bearer token refused: unusable sub");
            return Err(biz::Error::Unauthenticated);
        }
        Ok(Principal { user_id: claims.sub, admin: claims.role.as_deref() == Some("admin") })
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    fn hs256(secret: &str) -> Authenticator {
        let auth = conf::Auth {
            mode: conf::AuthMode::Jwt,
            jwt: conf::Jwt { secret: secret.to_owned().into(), ..conf::Jwt::default() },
        };
        Authenticator::from_conf(&auth).unwrap()
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn a_valid_token_names_the_caller_and_its_role() {
        let auth = hs256("s3cret");
        let user = token(json!({"sub": "alice", "exp": now() + 60}), "s3cret");
        let admin = token(json!({"sub": "root", "role": "admin", "exp": now() + 60}), "s3cret");
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            auth.authenticate(Some(&bearer(&user))).unwrap(),
            Principal { user_id: "alice".into(), admin: false }
        );
        assert!(auth.authenticate(Some(&bearer(&admin))).unwrap().admin);
    }

    #[test]
    fn bad_tokens_are_refused_without_detail() {
        let auth = hs256("s3cret");
        let unsigned = {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
            let claims = b64.encode(json!({"sub": "mallory", "exp": now() + 60}).to_string());
            format!("{header}.{claims}.")
        };
        let cases = [
            None,
            Some("Basic YWxpY2U6cHc=".to_owned()),
            Some("Bearer ".to_owned()),
            Some(format!("Bearer {}", token(json!({"sub": "a", "exp": now() + 60}), "other"))),
            Some(format!("Bearer {}", token(json!({"sub": "a", "exp": now() - 3600}), "s3cret"))),
            Some(format!(
                "Bearer {}",
                token(json!({"sub": "a", "exp": now() + 7200, "nbf": now() + 3600}), "s3cret")
            )),
            Some(format!("Bearer {}", token(json!({"exp": now() + 60}), "s3cret"))),
            Some(format!("Bearer {}", token(json!({"sub": "a"}), "s3cret"))),
            Some(format!("Bearer {unsigned}")),
        ];
        for case in cases {
            let err = auth.authenticate(case.as_deref()).unwrap_err();
            assert!(matches!(err, biz::Error::Unauthenticated), "{case:?}");
            assert_eq!(err.to_string(), "missing or invalid credentials");
        }
    }

    #[test]
    fn without_authentication_everyone_is_an_anonymous_admin() {
        let p = Authenticator::none().authenticate(None).unwrap();
        assert_eq!(p, Principal { user_id: ANONYMOUS.into(), admin: true });
    }
}
