//! What a token may learn of itself, and what an `admin` token may change: API tokens (list,
//! create, revoke) and agents (revoke). A tenant's admin acts on its own tenant only — another
//! tenant's token or agent is answered as if it did not exist (404), and it cannot make a
//! token for every tenant; an admin for every tenant acts on all.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::auth::Grant;
use super::{ApiError, AppState, bad};
use crate::api_tokens::{ApiToken, Role, parse_duration};

/// A token as the API shows it (never the token itself).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct TokenInfo {
    id: String,
    /// Absent: every tenant.
    tenant: Option<String>,
    /// `viewer`, `ops` or `admin`.
    role: String,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    /// `active`, `expired` or `revoked`.
    state: String,
}

fn time(t: i64) -> String {
    crate::store::query::time_text(t)
}

impl TokenInfo {
    fn of(t: ApiToken, now: i64) -> TokenInfo {
        let state = t.state(now);
        TokenInfo {
            id: t.id,
            tenant: t.tenant,
            role: t.role.name().into(),
            created_at: time(t.created_at),
            expires_at: t.expires_at.map(time),
            revoked_at: t.revoked_at.map(time),
            state: state.into(),
        }
    }
}

/// The token making the request.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Me {
    token_id: String,
    /// Absent: every tenant.
    tenant: Option<String>,
    role: String,
}

#[utoipa::path(get, path = "/api/v1/me", tag = "admin",
    responses((status = 200, description = "The token making the request: its id, tenant and role", body = Me), super::openapi::Refusals))]
pub(super) async fn me(axum::Extension(grant): axum::Extension<Grant>) -> Json<Me> {
    Json(Me { token_id: grant.id, tenant: grant.tenant, role: grant.role.name().into() })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("the registry: {e:#}")))
}

/// Whether `grant` may act on something of `tenant` (None: every tenant's).
fn reaches(grant: &Grant, tenant: Option<&str>) -> bool {
    match (&grant.tenant, tenant) {
        (None, _) => true,
        (Some(own), Some(t)) => own == t,
        (Some(_), None) => false,
    }
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "admin",
    responses((status = 200, description = "The API tokens this admin reaches, oldest first (role admin)", body = Vec<TokenInfo>), super::openapi::Refusals))]
pub(super) async fn list_tokens(
    State(state): State<AppState>,
    axum::Extension(grant): axum::Extension<Grant>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    let tokens = state.admin.tokens.clone();
    let list = blocking(move || tokens.list()).await?;
    let now = chrono::Utc::now().timestamp();
    Ok(Json(list.into_iter().filter(|t| reaches(&grant, t.tenant.as_deref())).map(|t| TokenInfo::of(t, now)).collect()))
}

/// A token to make.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    /// The tenant it reads; absent: the admin's own tenant (an admin for every tenant must
    /// name one, or set `all_tenants`).
    #[serde(default)]
    tenant: Option<String>,
    /// A token for every tenant (only an admin for every tenant may make one).
    #[serde(default)]
    all_tenants: bool,
    /// `viewer` (default), `ops` or `admin`.
    #[serde(default)]
    role: Option<String>,
    /// How long it stays valid: `30m`, `24h`, `90d` (default), seconds, or `never`.
    #[serde(default)]
    expires: Option<String>,
}

/// A token just made: the only time the token itself is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct MadeToken {
    token: String,
    #[serde(flatten)]
    info: TokenInfo,
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "admin", request_body = NewToken,
    responses((status = 201, description = "The token, shown only now, and its id (role admin)", body = MadeToken), super::openapi::Refusals))]
pub(super) async fn create_token(
    State(state): State<AppState>,
    axum::Extension(grant): axum::Extension<Grant>,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<MadeToken>), ApiError> {
    let Json(new) = body.map_err(|e| bad(format!("the request body: {}", e.body_text())))?;
    let tenant = match (new.all_tenants, new.tenant, &grant.tenant) {
        (true, Some(_), _) => return Err(bad("tenant and all_tenants: give one".into())),
        (true, None, None) => None,
        (true, None, Some(own)) => {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "all_tenants: this token is for tenant {own:?}; only an admin for every tenant makes such tokens"
                ),
            ));
        }
        (false, Some(t), Some(own)) if &t != own => {
            return Err(ApiError(StatusCode::FORBIDDEN, format!("tenant={t:?}: this token is for tenant {own:?}")));
        }
        (false, Some(t), _) => Some(t),
        (false, None, Some(own)) => Some(own.clone()),
        (false, None, None) => return Err(bad("tenant: name the tenant the token reads (or set all_tenants)".into())),
    };
    if let Some(t) = &tenant
        && !crate::fleet::valid_agent_id(t)
    {
        return Err(bad(format!("tenant={t:?}: letters, digits, '-', '_' and '.' only, at most 128")));
    }
    let role = match new.role.as_deref() {
        None => Role::Viewer,
        Some(r) => Role::by_name(r).ok_or_else(|| bad(format!("role={r:?}: expected viewer, ops or admin")))?,
    };
    let ttl = match new.expires.as_deref() {
        Some("never") => None,
        Some(text) => Some(parse_duration(text).map_err(|e| bad(format!("expires: {e}")))?),
        None => Some(std::time::Duration::from_secs(90 * 86_400)),
    };
    let tokens = state.admin.tokens.clone();
    let now = chrono::Utc::now().timestamp();
    let made_for = tenant.clone();
    let (id, token) = blocking(move || tokens.create(made_for.as_deref(), role, ttl, now)).await?;
    tracing::info!(id = %id, tenant = ?tenant, role = role.name(), by = %grant.id, "API token created over the API");
    let expires_at = ttl.map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    let info = TokenInfo::of(ApiToken { id, tenant, role, created_at: now, expires_at, revoked_at: None }, now);
    Ok((StatusCode::CREATED, Json(MadeToken { token, info })))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "admin",
    params(("id" = String, Path, description = "the token's id")),
    responses((status = 200, description = "Revoked: refused by every API server within seconds (role admin)", body = TokenInfo), (status = 404, description = "No such token this admin reaches", body = super::openapi::ErrorBody), super::openapi::Refusals))]
pub(super) async fn revoke_token(
    State(state): State<AppState>,
    axum::Extension(grant): axum::Extension<Grant>,
    Path(id): Path<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let tokens = state.admin.tokens.clone();
    let now = chrono::Utc::now().timestamp();
    let found = blocking(move || {
        let found = tokens.list()?.into_iter().find(|t| t.id == id && reaches(&grant, t.tenant.as_deref()));
        match found {
            Some(mut t) => {
                tokens.revoke(&t.id, now)?;
                tracing::info!(id = %t.id, by = %grant.id, "API token revoked over the API");
                // As the registry keeps it: an earlier revocation stands.
                t.revoked_at.get_or_insert(now);
                Ok(Some(t))
            }
            None => Ok(None),
        }
    })
    .await?;
    found
        .map(|t| Json(TokenInfo::of(t, now)))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no such API token".into()))
}

/// An agent as the registry knows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AgentInfo {
    agent_id: String,
    tenant: String,
    enrolled_at: String,
    revoked_at: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/agents/{id}/revoke", tag = "admin",
    params(("id" = String, Path, description = "the agent's id")),
    responses((status = 200, description = "Revoked: its connections close and it cannot reconnect, on every gateway, within one heartbeat (role admin)", body = AgentInfo), (status = 404, description = "No such agent this admin reaches", body = super::openapi::ErrorBody), super::openapi::Refusals))]
pub(super) async fn revoke_agent(
    State(state): State<AppState>,
    axum::Extension(grant): axum::Extension<Grant>,
    Path(id): Path<String>,
) -> Result<Json<AgentInfo>, ApiError> {
    let fleet = state.admin.fleet.clone();
    let now = chrono::Utc::now().timestamp();
    let found = blocking(move || match fleet.agent(&id)?.filter(|a| reaches(&grant, Some(&a.tenant))) {
        Some(mut a) => {
            fleet.revoke(&a.agent_id, now)?;
            tracing::info!(agent = %a.agent_id, by = %grant.id, "agent revoked over the API");
            // As the registry keeps it: an earlier revocation stands.
            a.revoked_at.get_or_insert(now);
            Ok(Some(a))
        }
        None => Ok(None),
    })
    .await?;
    found
        .map(|a| {
            Json(AgentInfo {
                agent_id: a.agent_id,
                tenant: a.tenant,
                enrolled_at: time(a.enrolled_at),
                revoked_at: a.revoked_at.map(time),
            })
        })
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no such agent".into()))
}
