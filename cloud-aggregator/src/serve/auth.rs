//! Every `/api` request carries an API token ([`crate::api_tokens`]): `Authorization: Bearer
//! <token>`, or `access_token=<token>` on the live push (a browser's EventSource cannot set
//! headers). The token decides:
//! - whether the request is answered at all (401: missing, unknown, expired or revoked);
//! - the tenant: a token of one tenant reads only that tenant — its requests get `tenant=` set,
//!   and a `tenant` parameter naming another is refused (403), never ignored;
//! - the role a route needs: the fleet (`/api/v1/agents`) and the counters need `ops`; the
//!   counters, which are the whole service's, a token for every tenant; the tokens and revoking
//!   an agent need `admin`;
//! - a rate: each token may make `[serve] requests_per_sec_per_token` requests a second
//!   (default [`DEFAULT_RATE`]; bursts of four seconds' worth), beyond which it gets 429.
//!
//! A token's grant is cached for [`CACHE_TTL`], so a revocation takes effect within that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};

use crate::api_tokens::{ApiToken, ApiTokens, Refused, Role};

/// How long a token's grant (or refusal) is believed.
pub(super) const CACHE_TTL: Duration = Duration::from_secs(2);
/// Most grants cached at once.
const CACHE_MAX: usize = 10_000;
/// Requests per second per token, by default.
pub const DEFAULT_RATE: f64 = 50.0;

/// A token's grant or refusal, and when it was read.
type Cached = (Result<ApiToken, Refused>, Instant);

/// What the request's token grants, for handlers that shape their answer by it (the live push
/// leaves out what the role may not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Grant {
    /// The token's public id.
    pub(super) id: String,
    /// None: every tenant.
    pub(super) tenant: Option<String>,
    pub(super) role: Role,
}

#[derive(Clone)]
pub(super) struct Auth {
    tokens: ApiTokens,
    /// Requests per second per token, and how many at once.
    rate: f64,
    burst: f64,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
    buckets: Arc<Mutex<HashMap<String, (f64, Instant)>>>,
}

impl Auth {
    pub(super) fn new(tokens: ApiTokens, rate: f64) -> Auth {
        let rate = if rate.is_finite() && rate > 0.0 { rate } else { DEFAULT_RATE };
        Auth { tokens, rate, burst: (rate * 4.0).max(1.0), cache: Arc::default(), buckets: Arc::default() }
    }

    async fn grant(&self, token: String) -> Result<ApiToken, Refused> {
        if let Some((grant, at)) = lock(&self.cache).get(&token)
            && at.elapsed() < CACHE_TTL
        {
            return grant.clone();
        }
        let tokens = self.tokens.clone();
        let key = token.clone();
        let grant = tokio::task::spawn_blocking(move || tokens.check(&key, chrono::Utc::now().timestamp()))
            .await
            .unwrap_or_else(|e| Err(Refused::Unavailable(e.to_string())));
        let mut cache = lock(&self.cache);
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(token, (grant.clone(), Instant::now()));
        grant
    }

    /// Takes one request from the token's bucket at `now`; false when it is empty.
    fn allow(&self, id: &str, now: Instant) -> bool {
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= CACHE_MAX && !buckets.contains_key(id) {
            buckets.clear();
        }
        let (level, at) = buckets.entry(id.to_owned()).or_insert((self.burst, now));
        *level = (*level + now.saturating_duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *level < 1.0 {
            return false;
        }
        *level -= 1.0;
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn refuse(status: StatusCode, message: String) -> Response {
    let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The role a route needs.
fn needs(path: &str) -> Role {
    match path {
        "/api/v1/agents" | "/api/v1/fleet" | "/api/v1/fleet/history" | "/api/v1/stats" => Role::Ops,
        "/api/v1/tokens" => Role::Admin,
        p if p.starts_with("/api/v1/tokens/") || (p.starts_with("/api/v1/agents/") && p.ends_with("/revoke")) => {
            Role::Admin
        }
        _ => Role::Viewer,
    }
}

/// The middleware of every `/api` route.
pub(super) async fn require_token(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let mut pairs: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    let from_query = pairs.iter().position(|(k, _)| k == "access_token").map(|i| pairs.remove(i).1);
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|v| v.trim().to_owned());
    let token = match (bearer, from_query) {
        (Some(t), _) => t,
        (None, Some(t)) if path == "/api/v1/live" => t,
        (None, Some(_)) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "access_token is only taken by /api/v1/live; send `Authorization: Bearer <token>`".into(),
            );
        }
        (None, None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this API needs a token: send `Authorization: Bearer <token>` (make one with `cloud-aggregator api-token create`)"
                    .into(),
            );
        }
    };
    let grant = match auth.grant(token).await {
        Ok(g) => g,
        Err(Refused::Unavailable(e)) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("the token registry cannot be read: {e}"));
        }
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    let role = needs(&path);
    if grant.role < role {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("{path} needs a token of role {} or above; this one is {}", role.name(), grant.role.name()),
        );
    }
    if path == "/api/v1/stats" && grant.tenant.is_some() {
        return refuse(
            StatusCode::FORBIDDEN,
            "the counters are the whole service's: they need a token for every tenant".into(),
        );
    }
    if let Some(tenant) = &grant.tenant {
        if let Some((_, other)) = pairs.iter().find(|(k, v)| k == "tenant" && v != tenant) {
            return refuse(StatusCode::FORBIDDEN, format!("tenant={other:?}: this token is for tenant {tenant:?}"));
        }
        if !pairs.iter().any(|(k, _)| k == "tenant") {
            pairs.push(("tenant".into(), tenant.clone()));
        }
    }
    if !auth.allow(&grant.id, Instant::now()) {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("this token made more than {} requests a second; wait and retry", auth.rate),
        );
    }
    let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish();
    let uri = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
    match uri.parse::<Uri>() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("the request's address: {e}")),
    }
    request.extensions_mut().insert(Grant { id: grant.id, tenant: grant.tenant, role: grant.role });
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_gets_a_burst_then_its_rate() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::new(ApiTokens::open(dir.path(), &Default::default()).unwrap(), 50.0);
        let t0 = Instant::now();
        let allowed = (0..300).filter(|_| auth.allow("a", t0)).count();
        assert_eq!(allowed, 200, "four seconds' worth at once");
        assert!(auth.allow("b", t0), "another token has its own bucket");
        // One second later: the rate's worth again, and no more.
        let t1 = t0 + Duration::from_secs(1);
        let allowed = (0..100).filter(|_| auth.allow("a", t1)).count();
        assert_eq!(allowed, 50);
    }
}
