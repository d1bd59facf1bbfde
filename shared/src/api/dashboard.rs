//! The dashboard at `/`: the files `npm run build -w dashboard` wrote to
//! `dashboard/dist`, compiled into the binary (a Lambda package is one
//! file), served with a Content-Security-Policy that allows nothing but
//! this origin's own scripts, styles and API. A binary built before the
//! dashboard was says so at `/` instead.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::RustEmbed)]
#[folder = "../dashboard/dist"]
#[allow_missing = true]
struct Assets;

/// No inline script or style, no other origin, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

fn file(path: &str, cache: &'static str) -> Response {
    let Some(f) = Assets::get(path) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let mut resp = f.data.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(f.metadata.mimetype()) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    secure(h);
    resp
}

fn secure(h: &mut axum::http::HeaderMap) {
    secure_with(h, CSP.to_string());
}

fn secure_with(h: &mut axum::http::HeaderMap, csp: String) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static(CSP)),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// `GET /`: the page, always revalidated (its asset names change with
/// every build). Where live changes come from another origin (the stack's
/// WebSocket API), the page names it in a `<meta name="offload-realtime">`
/// and its CSP lets it connect there.
pub async fn index(axum::extract::State(state): axum::extract::State<super::AppState>) -> Response {
    if Assets::get("index.html").is_none() {
        let mut resp = (
            StatusCode::SERVICE_UNAVAILABLE,
            "The dashboard was not built into this binary. Build it first \
             (npm ci && npm run build -w clients/typescript -w dashboard, as scripts/dev.sh does), \
             then this binary. The API is at /api/.",
        )
            .into_response();
        secure(resp.headers_mut());
        return resp;
    }
    let mut resp = file("index.html", "no-cache");
    let Some(url) = state.settings.realtime_url.as_deref() else {
        return resp;
    };
    let Some(page) = Assets::get("index.html") else {
        return resp;
    };
    let origin = reqwest::Url::parse(url)
        .map(|u| u[..url::Position::BeforePath].to_string())
        .unwrap_or_default();
    let html = String::from_utf8_lossy(&page.data).replacen(
        "</head>",
        &format!("<meta name=\"offload-realtime\" content=\"{url}\"></head>"),
        1,
    );
    *resp.body_mut() = axum::body::Body::from(html);
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    secure_with(
        resp.headers_mut(),
        CSP.replace(
            "connect-src 'self'",
            &format!("connect-src 'self' {origin}"),
        ),
    );
    resp
}

/// `GET /assets/{file}`: content-hashed names, cached for a year.
pub async fn asset(Path(name): Path<String>) -> Response {
    file(
        &format!("assets/{name}"),
        "public, max-age=31536000, immutable",
    )
}
