//! Who is calling, and what they may call.
//!
//! A request carries `Authorization: Bearer <token>`. A token with the shape of a JWT is verified
//! when JWT is configured (HS256 or RS256 by its header, `exp` required, `nbf` checked, and `aud`
//! and `iss` required and checked when an audience or an issuer is configured);
//! anything else is looked up among the API keys. Keys are compared as SHA-256 digests with a
//! constant-time equality over every configured key, so neither a key's length nor its position
//! in the list shows in the timing. A principal is identified by its credential (`key:<name>` for
//! an API key, `jwt:<iss>:<sub>` for a JWT), which keys its rate-limit buckets and its audit
//! lines, so a token whose `sub` is a key's name never shares that key's allowance. A principal
//! has roles; roles map to route patterns
//! (`*`, `/v1/*`, `/metrics`). `/health` and `/ready` are public. With no key and no JWT
//! configured, authentication is off and every route is open.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::error::ApiError;
use super::ratelimit::RateLimits;
use crate::error::{Error, Result};

/// An API key and what it grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The secret the client sends as `Authorization: Bearer <key>`.
    pub key: String,
    /// Name in logs and metrics (default: `key-N`).
    #[serde(default)]
    pub name: Option<String>,
    /// Role (`user`, `admin` or one defined in [`AuthConfig::roles`]).
    #[serde(default = "default_role")]
    pub role: String,
    /// `Request.priority` of this key's requests (smaller runs first).
    #[serde(default)]
    pub priority: i32,
    /// Rate limits; `None` takes [`AuthConfig::default_limits`].
    #[serde(default)]
    pub limits: Option<RateLimits>,
}

impl ApiKey {
    /// Its name, or `key-N` for the `index`-th key of the configuration.
    pub(crate) fn display_name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("key-{index}"))
    }
}

/// The API keys of a keys file: TOML `[[keys]]` tables with the fields of [`ApiKey`] (`key`,
/// `name`, `role`, `priority`, `limits.requests_per_minute`, `limits.tokens_per_minute`), as
/// `serve --api-keys-file` and Python's `Server(api_keys_file=...)` read it. Errors name the file.
pub fn read_api_keys_file(path: &Path) -> Result<Vec<ApiKey>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct KeysFile {
        keys: Vec<ApiKey>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::config("api_keys_file", format!("{}: {msg}", path.display()));
    let file: KeysFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(i) = file.keys.iter().position(|k| k.key.is_empty()) {
        return Err(bad(format!("key {i} is empty")));
    }
    // A name is the key's identity (`key:<name>`: its buckets, its audit lines); two keys named
    // alike would share them. Unnamed keys are numbered by their place in the whole
    // configuration, which [`ServerConfig::validate`](super::ServerConfig::validate) checks.
    let named = file.keys.iter().enumerate();
    if let Some((first, i, name)) =
        first_duplicate(named.filter_map(|(i, k)| Some((i, k.name.clone()?))))
    {
        return Err(bad(format!(
            "duplicate key name {name:?} (keys {first} and {i}; names must be unique)"
        )));
    }
    Ok(file.keys)
}

/// The first name given twice, as (its first index, the second index, the name).
pub(crate) fn first_duplicate(
    names: impl IntoIterator<Item = (usize, String)>,
) -> Option<(usize, usize, String)> {
    let mut seen = std::collections::HashMap::new();
    for (i, name) in names {
        if let Some(&first) = seen.get(&name) {
            return Some((first, i, name));
        }
        seen.insert(name, i);
    }
    None
}

fn default_role() -> String {
    "user".into()
}

/// JWT bearer tokens.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// PEM of the RSA public key for RS256 tokens.
    pub rs256_public_key_pem: Option<String>,
    /// Accepted `aud` values: a token must carry `aud` naming one of them. Empty skips the
    /// audience check.
    pub audience: Vec<String>,
    /// Accepted `iss` values: a token must carry `iss`, one of them. Empty skips the issuer check.
    pub issuer: Vec<String>,
    /// Claim holding the role (a string or a list); absent means `user`.
    pub role_claim: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_s: u64,
}

/// Authentication and authorization settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted API keys.
    pub api_keys: Vec<ApiKey>,
    /// Accepted JWTs.
    pub jwt: Option<JwtConfig>,
    /// Extra or overriding roles: role name to route patterns. Built in: `admin` = `["*"]`,
    /// `user` = `["/v1/*", "/tokenize", "/detokenize"]`.
    pub roles: BTreeMap<String, Vec<String>>,
    /// Limits of principals that have none of their own (JWTs, keys without `limits`).
    pub default_limits: RateLimits,
}

impl AuthConfig {
    /// Whether any credential is configured (otherwise every route is open).
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || self.jwt.is_some()
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The credential: `key:<name>` for an API key, `jwt:<iss>:<sub>` for a JWT (`iss`, `sub`
    /// empty when absent). Keys the rate-limit buckets and is the audit log's `credential_id`.
    pub id: String,
    /// Key name or JWT `sub`: the display name in messages and the audit log's `principal`.
    pub name: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// Priority of its requests.
    pub priority: i32,
    /// Its rate limits.
    pub limits: RateLimits,
}

struct KeyEntry {
    digest: [u8; 32],
    principal: Arc<Principal>,
}

/// The verifier built from an [`AuthConfig`].
pub(crate) struct Auth {
    enabled: bool,
    keys: Vec<KeyEntry>,
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    jwt: JwtConfig,
    roles: BTreeMap<String, Vec<String>>,
    default_limits: RateLimits,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Auth {
    pub(crate) fn new(config: &AuthConfig) -> Result<Self> {
        let mut keys = Vec::new();
        for (i, k) in config.api_keys.iter().enumerate() {
            if k.key.is_empty() {
                return Err(Error::config("auth.api_keys", format!("key {i} is empty")));
            }
            let name = k.display_name(i);
            keys.push(KeyEntry {
                digest: sha256(k.key.as_bytes()),
                principal: Arc::new(Principal {
                    id: format!("key:{name}"),
                    name,
                    roles: vec![k.role.clone()],
                    priority: k.priority,
                    limits: k
                        .limits
                        .clone()
                        .unwrap_or_else(|| config.default_limits.clone()),
                }),
            });
        }
        let jwt = config.jwt.clone().unwrap_or_default();
        let hs256 = jwt
            .hs256_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        let rs256 = match &jwt.rs256_public_key_pem {
            Some(pem) => Some(
                DecodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|e| Error::config("auth.jwt.rs256_public_key", e.to_string()))?,
            ),
            None => None,
        };
        if config.jwt.is_some() && hs256.is_none() && rs256.is_none() {
            return Err(Error::config(
                "auth.jwt",
                "JWT is enabled but neither an HS256 secret nor an RS256 public key is given",
            ));
        }
        let mut roles = BTreeMap::new();
        roles.insert("admin".to_string(), vec!["*".to_string()]);
        roles.insert(
            "user".to_string(),
            ["/v1/*", "/tokenize", "/detokenize"]
                .map(String::from)
                .to_vec(),
        );
        roles.extend(config.roles.clone());
        Ok(Auth {
            enabled: config.enabled(),
            keys,
            hs256,
            rs256,
            jwt,
            roles,
            default_limits: config.default_limits.clone(),
        })
    }

    /// The caller of a request; `Ok(None)` when authentication is off.
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Principal>>, ApiError> {
        if !self.enabled {
            return Ok(None);
        }
        let value = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "Missing credentials: send `Authorization: Bearer <API key or JWT>`.",
                )
            })?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("The Authorization header must be `Bearer <token>`.")
            })?;
        let looks_like_jwt = token.split('.').count() == 3 && token.starts_with("eyJ");
        if looks_like_jwt && (self.hs256.is_some() || self.rs256.is_some()) {
            return self.verify_jwt(token).map(Some);
        }
        self.find_key(token)
            .map(Some)
            .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
    }

    /// Constant-time over all keys: every digest is compared, the match is selected without a branch.
    fn find_key(&self, token: &str) -> Option<Arc<Principal>> {
        let digest = sha256(token.as_bytes());
        let mut index = u64::MAX;
        for (i, k) in self.keys.iter().enumerate() {
            let eq = k.digest.ct_eq(&digest);
            index = u64::conditional_select(&index, &(i as u64), eq);
        }
        self.keys
            .get(usize::try_from(index).ok()?)
            .map(|k| k.principal.clone())
    }

    fn verify_jwt(&self, token: &str) -> Result<Arc<Principal>, ApiError> {
        let invalid = |why: &str| ApiError::unauthorized(format!("Invalid bearer token: {why}."));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
        let (alg, key) = match header.alg {
            Algorithm::HS256 => (Algorithm::HS256, self.hs256.as_ref()),
            Algorithm::RS256 => (Algorithm::RS256, self.rs256.as_ref()),
            _ => (header.alg, None),
        };
        let key =
            key.ok_or_else(|| invalid(&format!("algorithm {:?} is not accepted", header.alg)))?;
        let mut v = Validation::new(alg);
        v.leeway = self.jwt.leeway_s;
        v.validate_nbf = true;
        // A configured audience or issuer is required, not only checked when present: a token
        // minted for another service (no `aud`) or by another issuer (no `iss`) must not pass.
        let mut required = vec!["exp"];
        if !self.jwt.audience.is_empty() {
            required.push("aud");
        }
        if !self.jwt.issuer.is_empty() {
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v.validate_aud = !self.jwt.audience.is_empty();
        if v.validate_aud {
            v.set_audience(&self.jwt.audience);
        }
        if !self.jwt.issuer.is_empty() {
            v.set_issuer(&self.jwt.issuer);
        }
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, key, &v).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => invalid("it has expired"),
                    ErrorKind::ImmatureSignature => invalid("it is not valid yet (nbf)"),
                    ErrorKind::InvalidAudience => invalid("wrong audience"),
                    ErrorKind::InvalidIssuer => invalid("wrong issuer"),
                    ErrorKind::InvalidSignature => invalid("bad signature"),
                    ErrorKind::MissingRequiredClaim(c) => invalid(&format!(
                        "it has no `{c}` claim, which this server requires"
                    )),
                    _ => invalid("cannot be verified"),
                }
            })?;
        let claims = data.claims;
        let role_claim = self.jwt.role_claim.as_deref().unwrap_or("role");
        let roles = match claims.get(role_claim) {
            Some(serde_json::Value::String(r)) => vec![r.clone()],
            Some(serde_json::Value::Array(rs)) => rs
                .iter()
                .filter_map(|r| r.as_str().map(String::from))
                .collect(),
            _ => vec![default_role()],
        };
        let claim = |c: &str| claims.get(c).and_then(|s| s.as_str());
        let sub = claim("sub");
        let id = format!("jwt:{}:{}", claim("iss").unwrap_or(""), sub.unwrap_or(""));
        let name = sub.unwrap_or("jwt").to_string();
        let priority = claims
            .get("priority")
            .and_then(|p| p.as_i64())
            .map_or(0, |p| p.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
        Ok(Arc::new(Principal {
            id,
            name,
            roles,
            priority,
            limits: self.default_limits.clone(),
        }))
    }

    /// 403 unless one of the principal's roles allows `path`.
    pub(crate) fn authorize(&self, principal: &Principal, path: &str) -> Result<(), ApiError> {
        let allowed = principal.roles.iter().any(|r| {
            self.roles
                .get(r)
                .is_some_and(|patterns| patterns.iter().any(|p| route_matches(p, path)))
        });
        if allowed {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "The role(s) {:?} of `{}` may not access {path}.",
                principal.roles, principal.name
            )))
        }
    }
}

/// `*` matches everything; `/a/*` matches `/a` and everything under it; otherwise exact.
fn route_matches(pattern: &str, path: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix("/*") {
        Some(prefix) => {
            path == prefix || (path.starts_with(prefix) && path[prefix.len()..].starts_with('/'))
        }
        None => pattern == path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(route_matches("*", "/metrics"));
        assert!(route_matches("/v1/*", "/v1/completions"));
        assert!(!route_matches("/v1/*", "/v10/x"));
        assert!(route_matches("/metrics", "/metrics"));
        assert!(!route_matches("/metrics", "/metricsx"));
    }

    #[test]
    fn keys_are_found_by_value() {
        let cfg = AuthConfig {
            api_keys: vec![
                ApiKey {
                    key: "a".into(),
                    name: None,
                    role: "user".into(),
                    priority: 0,
                    limits: None,
                },
                ApiKey {
                    key: "bb".into(),
                    name: Some("b".into()),
                    role: "admin".into(),
                    priority: 2,
                    limits: None,
                },
            ],
            ..Default::default()
        };
        let auth = Auth::new(&cfg).unwrap();
        assert_eq!(auth.find_key("bb").unwrap().name, "b");
        assert_eq!(auth.find_key("bb").unwrap().id, "key:b");
        assert_eq!(auth.find_key("a").unwrap().name, "key-0");
        assert_eq!(auth.find_key("a").unwrap().id, "key:key-0");
        assert!(auth.find_key("c").is_none());
    }
}
