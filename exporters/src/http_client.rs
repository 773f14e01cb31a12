//! The one HTTP client every HTTP exporter sends with (`otlphttp`, `prometheusremotewrite`):
//! headers, TLS, connect timeout and proxy from their settings; and what an HTTP answer means for
//! a retry (`Retry-After`, and each protocol's table of retryable statuses). The time one attempt
//! may take is the exporter helper's `timeout`, not the client's.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use podscope_core::{ConsumeError, FieldError};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;

use crate::tls::TlsSettings;

/// Time to open a connection (TCP and TLS), within an attempt's `timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client for one exporter. `proxy_url`: send every request through this HTTP proxy (unset
/// or empty: the `HTTP_PROXY` / `HTTPS_PROXY` / `NO_PROXY` environment applies, as in the
/// Collector).
pub fn build(
    headers: &BTreeMap<String, String>,
    tls: &TlsSettings,
    proxy_url: Option<&str>,
) -> anyhow::Result<reqwest::Client> {
    let mut default_headers = HeaderMap::new();
    for (name, value) in headers {
        default_headers.insert(
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    let mut builder = reqwest::Client::builder()
        .default_headers(default_headers)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("podscope/", env!("CARGO_PKG_VERSION")));
    if let Some(proxy) = proxy_url.filter(|p| !p.is_empty()) {
        builder = builder.proxy(reqwest::Proxy::all(proxy)?);
    }
    if tls.insecure_skip_verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(ca) = &tls.ca_file {
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        let mut pem = std::fs::read(cert)?;
        pem.extend_from_slice(&std::fs::read(key)?);
        builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// `headers:` entries that are not valid HTTP header names and values.
pub fn validate_headers(headers: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    for (name, value) in headers {
        if HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err()
            || HeaderValue::from_str(value).is_err()
        {
            errors.push(FieldError::new(
                format!("headers.{name}"),
                "not a valid header name and value",
            ));
        }
    }
}

/// TLS settings an HTTP exporter cannot honour: reqwest has no way to verify a server by
/// another name than the URL's, so `server_name_override` is refused rather than ignored.
pub fn validate_tls(tls: &TlsSettings, errors: &mut Vec<FieldError>) {
    tls.validate(errors);
    if tls.server_name_override.is_some() {
        errors.push(FieldError::new(
            "tls.server_name_override",
            "only the gRPC exporters (otlp, jaeger) support it; use a URL with that host name",
        ));
    }
}

/// `proxy_url:` must be an `http://` or `https://` URL (or empty: unset, which lets
/// `${env:HTTPS_PROXY:-}` leave it out).
pub fn validate_proxy_url(proxy_url: Option<&str>, errors: &mut Vec<FieldError>) {
    if let Some(url) = proxy_url.filter(|p| !p.is_empty()) {
        let ok = reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            errors.push(FieldError::new(
                "proxy_url",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
    }
}

/// The wait a `Retry-After` header asks for (delay-seconds or an HTTP date; a date in the past
/// is no wait). The exporter helper never waits less than its own backoff anyway.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A failed request (connection refused or reset, TLS, timeout): the backend may take it later.
pub fn transport_error(url: &str, error: &reqwest::Error) -> ConsumeError {
    ConsumeError::retryable("connection", format!("POST {url}: {error}"))
}

/// An answer that is not a success: retryable when `retryable(status)` says so (honouring
/// `Retry-After`), else permanent. The reason label is `http_<status>` for the statuses backends
/// commonly send, else `http_4xx` / `http_5xx`.
pub fn refused(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
    retryable: fn(u16) -> bool,
) -> ConsumeError {
    let message = format!(
        "HTTP {status}: {}",
        body.chars().take(200).collect::<String>()
    );
    let reason = reason(status.as_u16());
    if retryable(status.as_u16()) {
        ConsumeError::Retryable {
            reason,
            message,
            retry_after,
        }
    } else {
        ConsumeError::permanent(reason, message)
    }
}

/// Statuses backends commonly send, with their reason label.
const NAMED_STATUSES: [(u16, &str); 15] = [
    (400, "http_400"),
    (401, "http_401"),
    (403, "http_403"),
    (404, "http_404"),
    (408, "http_408"),
    (409, "http_409"),
    (413, "http_413"),
    (415, "http_415"),
    (422, "http_422"),
    (429, "http_429"),
    (500, "http_500"),
    (501, "http_501"),
    (502, "http_502"),
    (503, "http_503"),
    (504, "http_504"),
];

fn reason(status: u16) -> &'static str {
    match NAMED_STATUSES.iter().find(|(named, _)| *named == status) {
        Some((_, reason)) => reason,
        None if (400..500).contains(&status) => "http_4xx",
        None if (500..600).contains(&status) => "http_5xx",
        None => "http_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(retry_after: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_str(retry_after).unwrap());
        headers
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after(&headers("7")), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(&headers("Thu, 01 Jan 1970 00:00:00 GMT")),
            Some(Duration::ZERO)
        );
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(61));
        let wait = retry_after(&headers(&in_a_minute)).unwrap();
        assert!((59..=61).contains(&wait.as_secs()), "{wait:?}");
        assert_eq!(retry_after(&headers("soon")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn reasons_name_the_status() {
        let only_503 = |s: u16| s == 503;
        let e = refused(StatusCode::SERVICE_UNAVAILABLE, None, "", only_503);
        assert!(e.is_retryable());
        assert_eq!(e.reason(), "http_503");
        let e = refused(StatusCode::from_u16(418).unwrap(), None, "teapot", only_503);
        assert!(!e.is_retryable());
        assert_eq!(e.reason(), "http_4xx");
        assert!(e.to_string().contains("teapot"));
    }
}
