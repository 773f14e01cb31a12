//! `auth:` of a server endpoint: a bearer token read from a file (re-read when the file
//! changes, so a rotated Kubernetes Secret takes effect without a restart) and/or basic auth
//! against bcrypt hashes, as Prometheus' web config (`basic_auth_users`) does. A request passes
//! when it satisfies either; otherwise it gets 401 with a `WWW-Authenticate` challenge for each
//! scheme configured (gRPC: UNAUTHENTICATED).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::config::FieldError;

/// `auth:` of a server endpoint.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// File holding the bearer token clients send as `Authorization: Bearer <token>` (surrounding
    /// whitespace ignored). Re-read when its modification time changes.
    pub bearer_token_file: Option<PathBuf>,
    /// Users allowed with basic auth: user name → bcrypt hash of the password (`htpasswd -nBC 10
    /// user`, or Python's `bcrypt.hashpw`), as in Prometheus' web config.
    pub basic_auth_users: BTreeMap<String, String>,
}

impl AuthSettings {
    /// `prefix` is the settings' key path (`…auth`). The token file is read when the server
    /// starts, with errors naming it.
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.bearer_token_file.is_none() && self.basic_auth_users.is_empty() {
            errors.push(FieldError::new(
                prefix,
                "set bearer_token_file and/or basic_auth_users (or remove auth:)",
            ));
        }
        for (user, hash) in &self.basic_auth_users {
            if user.contains(':') || user.is_empty() {
                errors.push(FieldError::new(
                    format!("{prefix}.basic_auth_users"),
                    format!("{user:?}: a user name must be non-empty and without ':'"),
                ));
            }
            if bcrypt::HashParts::from_str(hash).is_err() {
                errors.push(FieldError::new(
                    format!("{prefix}.basic_auth_users.{user}"),
                    "is not a bcrypt hash ($2y$…, $2b$…)",
                ));
            }
        }
    }
}

fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read ({e})", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{}: the file is empty", path.display()));
    }
    Ok(token.to_string())
}

/// Why a request was turned away, with the challenges to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unauthorized {
    /// What was wrong, for the response body (never the credentials).
    pub message: &'static str,
    /// One `WWW-Authenticate` value per configured scheme.
    pub challenges: Vec<&'static str>,
}

struct BearerToken {
    path: PathBuf,
    /// The token and the file's modification time it was read at.
    current: Mutex<(String, Option<SystemTime>)>,
}

impl BearerToken {
    /// The token, re-read when the file's modification time moved. A file that became
    /// unreadable or empty keeps the last token (and is logged): clients keep working.
    fn token(&self) -> String {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if modified.is_some() && modified != current.1 {
            match read_token(&self.path) {
                Ok(token) => *current = (token, modified),
                Err(e) => {
                    tracing::warn!(error = %e, "bearer token file unusable; keeping the last token")
                }
            }
        }
        current.0.clone()
    }
}

/// Checks requests against an endpoint's `auth:` settings.
pub struct Authenticator {
    bearer: Option<BearerToken>,
    users: BTreeMap<String, String>,
    /// The password last verified per user: bcrypt costs tens of milliseconds by design, so a
    /// scraper sending the same credentials every few seconds is checked against it once.
    verified: Mutex<HashMap<String, Vec<u8>>>,
}

impl Authenticator {
    /// `where_` names the settings in errors (`exporters.prometheus.auth`).
    pub fn new(settings: &AuthSettings, where_: &str) -> anyhow::Result<Self> {
        let bearer = match &settings.bearer_token_file {
            Some(path) => {
                let token = read_token(path)
                    .map_err(|e| anyhow::anyhow!("{where_}.bearer_token_file: {e}"))?;
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                Some(BearerToken {
                    path: path.clone(),
                    current: Mutex::new((token, modified)),
                })
            }
            None => None,
        };
        Ok(Authenticator {
            bearer,
            users: settings.basic_auth_users.clone(),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the request's `Authorization` header passes.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Unauthorized> {
        let refuse = |message| Unauthorized {
            message,
            challenges: self.challenges(),
        };
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(refuse("authorization required"));
        };
        let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            if let Some(bearer) = &self.bearer {
                let token = bearer.token();
                if bool::from(token.as_bytes().ct_eq(credentials.as_bytes())) {
                    return Ok(());
                }
            }
            return Err(refuse("invalid bearer token"));
        }
        if scheme.eq_ignore_ascii_case("basic") && !self.users.is_empty() {
            if self.basic_passes(credentials) {
                return Ok(());
            }
            return Err(refuse("invalid user name or password"));
        }
        Err(refuse("unsupported authorization scheme"))
    }

    fn basic_passes(&self, credentials: &str) -> bool {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let Ok(user) = std::str::from_utf8(user) else {
            return false;
        };
        let Some(hash) = self.users.get(user) else {
            // Spend the same time as for a known user, so a timing does not tell which exist.
            let _ = bcrypt::verify(password, DUMMY_HASH);
            return false;
        };
        {
            let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified
                .get(user)
                .is_some_and(|known| bool::from(known.as_slice().ct_eq(password)))
            {
                return true;
            }
        }
        if bcrypt::verify(password, hash).unwrap_or(false) {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(user.to_string(), password.to_vec());
            return true;
        }
        false
    }

    fn challenges(&self) -> Vec<&'static str> {
        let mut challenges = Vec::new();
        if self.bearer.is_some() {
            challenges.push(r#"Bearer realm="podscope""#);
        }
        if !self.users.is_empty() {
            challenges.push(r#"Basic realm="podscope", charset="UTF-8""#);
        }
        challenges
    }
}

/// A bcrypt hash (cost 10) of a random password, checked for unknown users.
const DUMMY_HASH: &str = "$2b$10$pSdbNnl5H8MzWk4wxRWFwOqTtjgTQ4vCAGbU1j0U7JnWGd1zBqgLS";

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        headers
    }

    fn basic(user: &str, password: &str) -> String {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {encoded}")
    }

    #[test]
    fn bearer_token_from_a_file_and_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let settings = AuthSettings {
            bearer_token_file: Some(file.clone()),
            ..Default::default()
        };
        let auth = Authenticator::new(&settings, "x.auth").unwrap();
        assert_eq!(auth.check(&headers("Bearer s3cret")), Ok(()));
        let refused = auth.check(&headers("Bearer wrong")).unwrap_err();
        assert_eq!(refused.message, "invalid bearer token");
        assert_eq!(refused.challenges, vec![r#"Bearer realm="podscope""#]);
        assert_eq!(
            auth.check(&HeaderMap::new()).unwrap_err().message,
            "authorization required"
        );

        // A rotated secret: a new file content with a new modification time.
        std::fs::write(&file, "rotated").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(auth.check(&headers("Bearer s3cret")).is_err());
        assert_eq!(auth.check(&headers("Bearer rotated")), Ok(()));
    }

    #[test]
    fn basic_auth_against_bcrypt_hashes() {
        let hash = bcrypt::hash("hunter2", 4).unwrap();
        let settings = AuthSettings {
            basic_auth_users: [("prometheus".to_string(), hash)].into(),
            ..Default::default()
        };
        let auth = Authenticator::new(&settings, "x.auth").unwrap();
        assert_eq!(
            auth.check(&headers(&basic("prometheus", "hunter2"))),
            Ok(())
        );
        // Again, from the cache of verified passwords.
        assert_eq!(
            auth.check(&headers(&basic("prometheus", "hunter2"))),
            Ok(())
        );
        for wrong in [
            basic("prometheus", "hunter3"),
            basic("nobody", "hunter2"),
            "Basic not-base64!".to_string(),
            "Bearer hunter2".to_string(),
        ] {
            let refused = auth.check(&headers(&wrong)).unwrap_err();
            assert_eq!(
                refused.challenges,
                vec![r#"Basic realm="podscope", charset="UTF-8""#],
                "{wrong}"
            );
        }
    }

    #[test]
    fn bad_settings_name_the_key() {
        let mut errors = Vec::new();
        AuthSettings {
            bearer_token_file: Some("/nonexistent/token".into()),
            basic_auth_users: [("u".to_string(), "plaintext".to_string())].into(),
        }
        .validate("exporters.prometheus.auth", &mut errors);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec![
                "exporters.prometheus.auth.basic_auth_users.u: is not a bcrypt hash ($2y$…, $2b$…)"
            ]
        );
        let missing = AuthSettings {
            bearer_token_file: Some("/nonexistent/token".into()),
            ..Default::default()
        };
        let error = Authenticator::new(&missing, "exporters.prometheus.auth")
            .err()
            .unwrap();
        assert!(
            error.to_string().starts_with(
                "exporters.prometheus.auth.bearer_token_file: /nonexistent/token: cannot read"
            ),
            "{error}"
        );
        assert!(bcrypt::HashParts::from_str(DUMMY_HASH).is_ok());
        let mut errors = Vec::new();
        AuthSettings::default().validate("a.auth", &mut errors);
        assert_eq!(errors.len(), 1);
    }
}
