//! The OpenAPI document of the API, generated from the handlers' annotations and the routes
//! they are registered with (one registration makes both the route and its entry), served at
//! `/api/v1/openapi.json`. The types here only describe answers the handlers build as JSON.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::store::query::{Attribution, Behavior, Funnel, ProductRow, SalesRow};

/// The document's frame: title, the bearer-token scheme every route uses.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ActiDash API",
        description = "Analytics of on-prem e-commerce data, by event time, exact. Every figure is defined in docs/api.md. Money is decimal text."
    ),
    modifiers(&BearerToken),
    components(schemas(ErrorBody)),
    security(("bearer" = [])),
    tags(
        (name = "sales", description = "Orders, revenue, products"),
        (name = "behavior", description = "Sessions and the funnel"),
        (name = "marketing", description = "Attribution, spend, ROAS"),
        (name = "inventory", description = "Stock levels"),
        (name = "fleet", description = "Agents and processing (role ops)"),
        (name = "live", description = "Server-sent events")
    )
)]
pub(super) struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`cloud-aggregator api-token create`); the live push also takes `access_token`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The parameters every report takes (docs/api.md). Each dimension of a report is also a
/// filter: `channel=web,app` keeps rows whose channel is any of those.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct RangeParams {
    /// One tenant; a token of one tenant reads its own (another is a 403).
    tenant: Option<String>,
    /// Start of the event-time range, RFC 3339 or unix seconds (default: 24 hours before `to`).
    from: Option<String>,
    /// End of the range, exclusive (default: now).
    to: Option<String>,
    /// `minute`, `hour` or `day`: a series, one row per bucket; absent: one total.
    granularity: Option<String>,
    /// Comma-separated dimensions to group by.
    group_by: Option<String>,
}

/// An error: what was wrong, naming the parameter where one was.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct ErrorBody {
    error: String,
}

/// The range an answer covers (rounded out to whole minutes, or hours where a report is kept
/// per hour).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Range {
    from: String,
    to: String,
    granularity: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct SalesReport {
    #[schema(inline)]
    #[serde(flatten)]
    range: Range,
    rows: Vec<SalesRow>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct ProductsReport {
    #[schema(inline)]
    #[serde(flatten)]
    range: Range,
    /// `revenue` or `units`.
    sort: String,
    rows: Vec<ProductRow>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct BehaviorReport {
    #[schema(inline)]
    #[serde(flatten)]
    range: Range,
    #[serde(flatten)]
    report: Behavior,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct FunnelReport {
    #[schema(inline)]
    #[serde(flatten)]
    range: Range,
    #[serde(flatten)]
    report: Funnel,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct AttributionReport {
    #[schema(inline)]
    #[serde(flatten)]
    range: Range,
    #[serde(flatten)]
    report: Attribution,
}

/// Events per domain (and bucket, with a granularity).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct EventsRow {
    tenant: String,
    bucket: Option<String>,
    domain: String,
    events: i64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct EventsReport {
    #[schema(inline)]
    #[serde(flatten)]
    range: Range,
    rows: Vec<EventsRow>,
}

/// The refusals every report can give.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(super) enum Refusals {
    /// A parameter is unknown or malformed; the error names it.
    #[response(status = 400)]
    BadParameter(ErrorBody),
    /// No token, or an unknown, expired or revoked one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's role or tenant does not allow this.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The token's rate is used up; retry after a second.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
}
