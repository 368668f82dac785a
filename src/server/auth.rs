//! Authentication of API callers: `authorization: Bearer <JWT>` on gRPC and REST alike.
//!
//! With `auth.mode: jwt` the token must verify with the configured HS256 secret or RS256
//! public key; `exp` and `nbf` are enforced, and `aud` and `iss` when an audience or an
//! issuer is configured (tokens of real identity providers always carry an `aud`). `sub`
//! is the caller's user id; the roles at `auth.jwt.roles_claim` (a dotted path into the
//! claims, as Keycloak's `realm_access.roles`) containing `auth.jwt.admin_role` let them
//! see every instance. A missing or bad token is answered `UNAUTHENTICATED` without
//! saying why (the cause is logged at debug level only). With `auth.mode: none` every
//! caller is `anonymous` and an admin.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde_json::{Map, Value};

use crate::{biz, conf};

/// The user id of callers when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// Shortest HS256 secret accepted, in bytes.
pub const MIN_HS256_SECRET: usize = 32;

/// Who a verified caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub user_id: String,
    /// The token's roles include the admin role.
    pub admin: bool,
}

/// Verifies bearer tokens, or lets everyone in when authentication is off.
pub struct Authenticator {
    verifier: Option<Verifier>,
}

struct Verifier {
    key: DecodingKey,
    validation: Validation,
    roles_claim: String,
    admin_role: String,
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
                // RFC 7518 §3.2: a key at least as long as the hash output (256 bits).
                if secret.len() < MIN_HS256_SECRET {
                    return Err(format!(
                        "auth.jwt: the HS256 secret has {} bytes; it must have at least {MIN_HS256_SECRET} (RFC 7518 section 3.2)",
                        secret.len()
                    ));
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
        let mut required = vec!["exp", "sub"];
        if jwt.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&jwt.audience);
            required.push("aud");
        }
        if !jwt.issuer.is_empty() {
            validation.set_issuer(&[&jwt.issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            verifier: Some(Verifier {
                key,
                validation,
                roles_claim: jwt.roles_claim.clone(),
                admin_role: jwt.admin_role.clone(),
            }),
        })
    }

    /// The caller behind an `authorization` header value.
    ///
    /// # Errors
    /// `Unauthenticated` when the header is missing, is not a bearer token, or the token
    /// does not verify; the reason is logged at debug level, never answered.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, biz::Error> {
        let Some(verifier) = &self.verifier else {
            return Ok(Principal { user_id: ANONYMOUS.into(), admin: true });
        };
        let token = authorization
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or(biz::Error::Unauthenticated)?;
        if names_critical_extensions(token) {
            // RFC 7515 §4.1.11: extensions listed in `crit` must be understood, and none is.
            tracing::debug!("bearer token refused: it names critical header extensions");
            return Err(biz::Error::Unauthenticated);
        }
        let claims =
            jsonwebtoken::decode::<Map<String, Value>>(token, &verifier.key, &verifier.validation)
                .map_err(|e| {
                    tracing::debug!(error = %e, "bearer token refused");
                    biz::Error::Unauthenticated
                })?
                .claims;
        let sub = match claims.get("sub") {
            Some(Value::String(sub)) if crate::service::is_user_id(sub) => sub.clone(),
            _ => {
                tracing::debug!("bearer token refused: unusable sub");
                return Err(biz::Error::Unauthenticated);
            }
        };
        let admin = claim_at(&claims, &verifier.roles_claim)
            .is_some_and(|roles| has_role(roles, &verifier.admin_role));
        Ok(Principal { user_id: sub, admin })
    }
}

/// Whether the token's header carries `crit` (jsonwebtoken ignores the parameter).
fn names_critical_extensions(token: &str) -> bool {
    use base64::Engine;
    let Some(header) = token.split('.').next() else { return false };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Map<String, Value>>(&bytes).ok())
        .is_some_and(|header| header.contains_key("crit"))
}

/// The claim at a dotted `path`. A key may itself contain dots (Auth0's namespaced
/// `https://example.com/roles`): at each level the longest key that matches wins.
fn claim_at<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    path.match_indices('.').rev().find_map(|(dot, _)| match claims.get(&path[..dot])? {
        Value::Object(inner) => claim_at(inner, &path[dot + 1..]),
        _ => None,
    })
}

/// Whether a roles claim — a list of roles, or one string of space-separated roles (as
/// OAuth's `scope`) — holds `role`, exactly (roles are case-sensitive).
fn has_role(roles: &Value, role: &str) -> bool {
    match roles {
        Value::String(one) => one.split_whitespace().any(|r| r == role),
        Value::Array(many) => many.iter().any(|r| r.as_str() == Some(role)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "unit-test-secret-of-32-bytes-min";

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
        let auth = hs256(SECRET);
        let user = token(json!({"sub": "alice", "exp": now() + 60}), SECRET);
        let admin = token(json!({"sub": "root", "role": "admin", "exp": now() + 60}), SECRET);
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            auth.authenticate(Some(&bearer(&user))).unwrap(),
            Principal { user_id: "alice".into(), admin: false }
        );
        assert!(auth.authenticate(Some(&bearer(&admin))).unwrap().admin);
    }

    #[test]
    fn bad_tokens_are_refused_without_detail() {
        let auth = hs256(SECRET);
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
            Some(format!(
                "Bearer {}",
                token(json!({"sub": "a", "exp": now() + 60}), "another-secret-of-32-bytes-long!")
            )),
            Some(format!("Bearer {}", token(json!({"sub": "a", "exp": now() - 3600}), SECRET))),
            Some(format!(
                "Bearer {}",
                token(json!({"sub": "a", "exp": now() + 7200, "nbf": now() + 3600}), SECRET)
            )),
            Some(format!("Bearer {}", token(json!({"exp": now() + 60}), SECRET))),
            Some(format!("Bearer {}", token(json!({"sub": "a"}), SECRET))),
            Some(format!("Bearer {unsigned}")),
        ];
        for case in cases {
            let err = auth.authenticate(case.as_deref()).unwrap_err();
            assert!(matches!(err, biz::Error::Unauthenticated), "{case:?}");
            assert_eq!(err.to_string(), "missing or invalid credentials");
        }
    }

    #[test]
    fn roles_are_found_at_dotted_paths_and_namespaced_claims() {
        let claims = json!({
            "role": "admin",
            "realm_access": {"roles": ["offline_access", "admin"]},
            "https://example.com/roles": ["ops"],
            "https://example.com": {"x": 1},
            "scope": "openid resource.admin",
            "nested": {"a.b": {"c": ["deep"]}},
        });
        let claims = claims.as_object().unwrap();
        let roles =
            |path: &str, role: &str| claim_at(claims, path).is_some_and(|r| has_role(r, role));
        assert!(roles("role", "admin"));
        assert!(roles("realm_access.roles", "admin"));
        assert!(roles("https://example.com/roles", "ops"), "a key with dots wins over a path");
        assert!(roles("scope", "resource.admin"), "a space-separated string is a list");
        assert!(roles("nested.a.b.c", "deep"));
        assert!(!roles("realm_access.roles", "Admin"), "roles are case-sensitive");
        assert!(!roles("realm_access", "admin"), "an object is not a list of roles");
        assert!(!roles("missing.path", "admin"));
        assert!(!roles("realm_access.roles.more", "admin"));
    }

    #[test]
    fn audience_and_issuer_are_checked_only_when_configured() {
        let secret = SECRET;
        let with = |audience: &[&str], issuer: &str| {
            let auth = conf::Auth {
                mode: conf::AuthMode::Jwt,
                jwt: conf::Jwt {
                    secret: secret.to_owned().into(),
                    audience: audience.iter().map(|a| (*a).to_owned()).collect(),
                    issuer: issuer.to_owned(),
                    ..conf::Jwt::default()
                },
            };
            Authenticator::from_conf(&auth).unwrap()
        };
        let bearer = |claims: serde_json::Value| format!("Bearer {}", token(claims, secret));
        let exp = now() + 60;
        let aud_list =
            bearer(json!({"sub": "a", "exp": exp, "aud": ["x", "api"], "iss": "https://idp"}));
        let aud_string = bearer(json!({"sub": "a", "exp": exp, "aud": "api"}));
        let no_aud = bearer(json!({"sub": "a", "exp": exp}));

        let open = with(&[], "");
        for t in [&aud_list, &aud_string, &no_aud] {
            assert!(open.authenticate(Some(t)).is_ok(), "no audience configured: aud unchecked");
        }
        let api = with(&["other", "api"], "");
        assert!(api.authenticate(Some(&aud_list)).is_ok());
        assert!(api.authenticate(Some(&aud_string)).is_ok());
        assert!(api.authenticate(Some(&no_aud)).is_err(), "aud required once configured");
        assert!(with(&["nope"], "").authenticate(Some(&aud_string)).is_err());
        let issuer = with(&[], "https://idp");
        assert!(issuer.authenticate(Some(&aud_list)).is_ok());
        assert!(issuer.authenticate(Some(&aud_string)).is_err(), "iss required once configured");
    }

    #[test]
    fn a_token_naming_critical_extensions_and_a_short_secret_are_refused() {
        use base64::Engine;
        let auth = hs256(SECRET);
        let header = Header { kid: Some("k1".into()), ..Header::default() };
        let plain = jsonwebtoken::encode(
            &header,
            &json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(auth.authenticate(Some(&format!("Bearer {plain}"))).is_ok());
        // The same token with `crit` in its header, signed anew.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = b64.encode(br#"{"alg":"HS256","typ":"JWT","crit":["exp-ext"],"exp-ext":1}"#);
        let body = plain.split('.').nth(1).unwrap();
        let signing_input = format!("{head}.{body}");
        let signature = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        let critical = format!("Bearer {signing_input}.{signature}");
        assert!(auth.authenticate(Some(&critical)).is_err());

        let short = conf::Auth {
            mode: conf::AuthMode::Jwt,
            jwt: conf::Jwt { secret: "s3cret".to_owned().into(), ..conf::Jwt::default() },
        };
        let refused = Authenticator::from_conf(&short).err().expect("refused");
        assert!(refused.contains("at least 32"), "{refused}");
    }

    #[test]
    fn without_authentication_everyone_is_an_anonymous_admin() {
        let p = Authenticator::none().authenticate(None).unwrap();
        assert_eq!(p, Principal { user_id: ANONYMOUS.into(), admin: true });
    }
}
