//! Read access (`--read-token`): who may see the page and the `/api/v1` reads.
//!
//! API clients send `Authorization: Bearer <token>`. A browser cannot add a header to a
//! navigation, so the page also takes the token once as `/?token=<token>`: the answer sets an
//! HttpOnly, SameSite=Strict cookie holding the read token and redirects to `/`, which drops the
//! token from the address bar; from then on the cookie authorizes the page and the script's
//! API calls. The cookie only ever authorizes reads, so a forged cross-site request cannot use
//! it to change anything (the admin endpoints take the bearer header only).

use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::api::{constant_time_eq, ApiError};
use super::{with_state, DashboardState};

/// Name of the cookie that carries the read token (hex-encoded: tokens may hold `;` or `,`).
pub(crate) const COOKIE: &str = "dagster_taskiq_read";

const LOGIN_HTML: &str = include_str!("login.html");
/// The token page posts nothing anywhere but its own form to this origin.
const LOGIN_CSP: &str = "default-src 'none'; style-src 'self'; base-uri 'none'; \
                         form-action 'self'; frame-ancestors 'none'";

/// The token of an `Authorization: Bearer <token>` header.
pub(super) fn bearer(header: Option<&str>) -> Option<&str> {
    header
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Whether `presented` grants read access: the read token, or the admin token (which grants
/// everything). Without a read token everyone may read.
fn grants_read(state: &DashboardState, presented: &[u8]) -> bool {
    let Some(read) = &state.read_token else {
        return true;
    };
    // Both comparisons always run, so the time taken does not say which token was close.
    let is_read = constant_time_eq(presented, read.as_bytes());
    let is_admin = state
        .admin_token
        .as_ref()
        .is_some_and(|admin| constant_time_eq(presented, admin.as_bytes()));
    is_read | is_admin
}

/// Whether the request may read: open without a read token, else the bearer header or the
/// cookie must carry a token that grants it.
pub(super) fn may_read(
    state: &DashboardState,
    authorization: Option<&str>,
    cookie: Option<&str>,
) -> bool {
    if state.read_token.is_none() {
        return true;
    }
    if let Some(token) = bearer(authorization) {
        return grants_read(state, token.as_bytes());
    }
    cookie_token(cookie).is_some_and(|token| grants_read(state, &token))
}

/// The decoded read-token cookie of a `Cookie` header.
fn cookie_token(header: Option<&str>) -> Option<Vec<u8>> {
    header?
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| hex_decode(value))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Rejects API reads that lack read access with a 401 JSON error.
pub(super) fn require_read(
    state: DashboardState,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::header::optional::<String>("cookie"))
        .and(with_state(state))
        .and_then(
            |authorization: Option<String>, cookie: Option<String>, state: DashboardState| async move {
                if may_read(&state, authorization.as_deref(), cookie.as_deref()) {
                    Ok(())
                } else {
                    Err(warp::reject::custom(ApiError::ReadUnauthorized))
                }
            },
        )
        .untuple_one()
}

/// What `/` answers: the page, or the token page (401), or, for `?token=`, the cookie and a
/// redirect to `/`.
pub(super) enum PageAccess {
    Page,
    AskForToken { wrong: bool },
    SetCookieAndRedirect,
}

pub(super) fn page_access(
    state: &DashboardState,
    query_token: Option<&str>,
    authorization: Option<&str>,
    cookie: Option<&str>,
) -> PageAccess {
    match query_token {
        // Without a read token there is nothing to remember: just drop it from the URL.
        Some(_) if state.read_token.is_none() => PageAccess::SetCookieAndRedirect,
        Some(token) if grants_read(state, token.trim().as_bytes()) => {
            PageAccess::SetCookieAndRedirect
        }
        Some(_) => PageAccess::AskForToken { wrong: true },
        None if may_read(state, authorization, cookie) => PageAccess::Page,
        None => PageAccess::AskForToken { wrong: false },
    }
}

/// The token page: a form that loads `/?token=...`; no script, no data.
pub(super) fn ask_for_token(wrong: bool) -> Response {
    let message = if wrong {
        "That token is not valid here."
    } else {
        "This controller needs its read token (--read-token) to show the dashboard."
    };
    let mut response = LOGIN_HTML.replace("{message}", message).into_response();
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(LOGIN_CSP),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// 303 to `/`, setting the cookie when reads need a token. The cookie always holds the read
/// token, also after a login with the admin token, so it never carries admin rights.
pub(super) fn set_cookie_and_redirect(state: &DashboardState) -> Response {
    let mut response = Response::new(Default::default());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static("/"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if let Some(read) = &state.read_token {
        let cookie = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            hex_encode(read.as_bytes())
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            headers.insert(SET_COOKIE, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let token = "a;b,c=d\"e-0123456789";
        assert_eq!(
            hex_decode(&hex_encode(token.as_bytes())).as_deref(),
            Some(token.as_bytes())
        );
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode("é1"), None);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let header = format!("other=1; {COOKIE}=6162; x=y");
        assert_eq!(cookie_token(Some(&header)), Some(b"ab".to_vec()));
        assert_eq!(cookie_token(Some("other=1")), None);
        assert_eq!(cookie_token(None), None);
    }

    #[test]
    fn bearer_needs_the_scheme() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }
}
