//! HTTP/1.x message heads as the kernel captured them: a request head (maybe cut at the capture
//! limit) and a response's status line. Pure functions over bytes; anything that is not HTTP is
//! an error, never a panic.

/// What a span needs from a request head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path of the request target, without query string or fragment.
    pub path: String,
    /// `1.0` or `1.1`.
    pub version: &'static str,
    /// The `Host` header.
    pub host: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeadParse {
    Complete(RequestHead),
    /// More bytes are needed (a head split over several reads).
    Partial,
    /// Not an HTTP/1 request.
    Invalid,
}

const MAX_HEADERS: usize = 64;

/// Parses a request head. `truncated`: the capture limit was reached, so what is there is all
/// there will be: the complete header lines are used.
pub fn parse_request(bytes: &[u8], truncated: bool) -> HeadParse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => HeadParse::Complete(head_of(&request)),
        Ok(httparse::Status::Partial) if truncated => parse_truncated(bytes),
        Ok(httparse::Status::Partial) => HeadParse::Partial,
        // More headers than we look at: the request line and the first ones still count.
        Err(httparse::Error::TooManyHeaders) => parse_truncated(bytes),
        Err(_) => HeadParse::Invalid,
    }
}

/// A head cut at the capture limit: the complete lines, closed by a blank line.
fn parse_truncated(bytes: &[u8]) -> HeadParse {
    let Some(last_line_end) = bytes.windows(2).rposition(|w| w == b"\r\n") else {
        return HeadParse::Invalid;
    };
    let mut closed = bytes[..last_line_end + 2].to_vec();
    closed.extend_from_slice(b"\r\n");
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&closed) {
        Ok(httparse::Status::Complete(_)) => HeadParse::Complete(head_of(&request)),
        Err(httparse::Error::TooManyHeaders) => {
            // Only the request line, then.
            let line_end = closed.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
            let mut line = closed[..line_end].to_vec();
            line.extend_from_slice(b"\r\n\r\n");
            let mut none = [httparse::EMPTY_HEADER; 0];
            let mut request = httparse::Request::new(&mut none);
            match request.parse(&line) {
                Ok(httparse::Status::Complete(_)) => HeadParse::Complete(head_of(&request)),
                _ => HeadParse::Invalid,
            }
        }
        _ => HeadParse::Invalid,
    }
}

fn head_of(request: &httparse::Request<'_, '_>) -> RequestHead {
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(|v| v.trim().to_string())
    };
    RequestHead {
        method: request.method.unwrap_or_default().to_string(),
        path: path_of(request.path.unwrap_or_default()),
        version: if request.version == Some(0) { "1.0" } else { "1.1" },
        host: header("host"),
        traceparent: header("traceparent"),
        tracestate: header("tracestate"),
    }
}

/// The path of a request target: origin form (`/a?b`) or absolute form (`http://h/a?b`),
/// without query string and fragment.
pub fn path_of(target: &str) -> String {
    let without_scheme = match target.find("://") {
        Some(i) => {
            let rest = &target[i + 3..];
            rest.find('/').map(|j| &rest[j..]).unwrap_or("/")
        }
        None => target,
    };
    let end = without_scheme.find(['?', '#']).unwrap_or(without_scheme.len());
    without_scheme[..end].to_string()
}

/// The status code of a response's status line (`HTTP/1.1 200 OK`), or `None` if it is not one.
pub fn parse_status(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.")?;
    if rest.len() < 5 || !matches!(rest[0], b'0' | b'1') || rest[1] != b' ' {
        return None;
    }
    let code = &rest[2..5];
    if !code.iter().all(u8::is_ascii_digit) || rest.get(5).is_some_and(|b| b.is_ascii_digit()) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_gives_method_path_without_query_and_context_headers() {
        let head = b"GET /items/1?secret=x HTTP/1.1\r\nHost: shop:8080\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nTraceState: a=b\r\n\r\n";
        let HeadParse::Complete(h) = parse_request(head, false) else {
            panic!("complete")
        };
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/items/1");
        assert_eq!(h.version, "1.1");
        assert_eq!(h.host.as_deref(), Some("shop:8080"));
        assert_eq!(
            h.traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(h.tracestate.as_deref(), Some("a=b"));
    }

    #[test]
    fn a_split_head_is_partial_until_it_is_whole_and_a_truncated_one_uses_its_full_lines() {
        assert_eq!(parse_request(b"GET /a HTTP/1.1\r\nHost: x\r\n", false), HeadParse::Partial);
        assert_eq!(parse_request(b"GET /a HT", false), HeadParse::Partial);
        let HeadParse::Complete(h) = parse_request(b"POST /a HTTP/1.0\r\nHost: x\r\nCookie: abc", true)
        else {
            panic!("complete")
        };
        assert_eq!((h.method.as_str(), h.path.as_str(), h.version), ("POST", "/a", "1.0"));
        assert_eq!(h.host.as_deref(), Some("x"));
        assert_eq!(parse_request(b"GET /a-very-long-path-cut", true), HeadParse::Invalid);
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        assert_eq!(parse_request(b"GET \x00\xff\xfe HTTP/1.1\r\n\r\n", false), HeadParse::Invalid);
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00", false), HeadParse::Invalid);
        assert_eq!(parse_status(b"HTTP/1.1 2000 OK"), None);
        assert_eq!(parse_status(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status(b"HTTP/2 200"), None);
    }

    #[test]
    fn status_lines_and_absolute_targets() {
        assert_eq!(parse_status(b"HTTP/1.1 404 Not Found\r\n"), Some(404));
        assert_eq!(parse_status(b"HTTP/1.0 500 "), Some(500));
        assert_eq!(parse_status(b"HTTP/1.1 100 Continue\r\n\r\n"), Some(100));
        assert_eq!(path_of("http://example.com/x/y?q=1#f"), "/x/y");
        assert_eq!(path_of("http://example.com"), "/");
        assert_eq!(path_of("/p#frag"), "/p");
    }
}
