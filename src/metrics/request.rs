//! The request side of the metrics HTTP server (`http.rs`): where a
//! request head ends, and what it asks for. Pure and free of crate
//! imports, so fuzz/fuzz_targets/metrics_request.rs compiles it alone.

/// The responses the metrics server gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200: the metrics page.
    Ok,
    /// 400: not an HTTP/1.x request line.
    BadRequest,
    /// 404: another path.
    NotFound,
    /// 405: a method other than GET and HEAD.
    MethodNotAllowed,
    /// 431: the head is longer than the server reads.
    HeadTooLarge,
    /// 503: every connection slot is taken.
    Busy,
}

impl Status {
    /// The status line's code and reason.
    pub fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::Busy => "503 Service Unavailable",
        }
    }
}

/// Whether `buf` holds a whole request head (it ends at a blank line;
/// bare LF line ends are taken too).
pub fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// What a request head asks for: the status to answer with, and whether
/// the method was HEAD (no body).
pub fn route(head: &[u8]) -> (Status, bool) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else { return (Status::BadRequest, false) };
    let mut parts = line.strip_suffix('\r').unwrap_or(line).split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (Status::BadRequest, false);
    };
    if !version.starts_with("HTTP/1.") {
        return (Status::BadRequest, false);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (Status::MethodNotAllowed, false);
    }
    match target.split('?').next().unwrap_or_default() {
        "/metrics" => (Status::Ok, head_only),
        _ => (Status::NotFound, head_only),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), (Status::Ok, false));
        assert_eq!(route(b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n"), (Status::Ok, false));
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), (Status::Ok, true));
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), (Status::NotFound, false));
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), (Status::MethodNotAllowed, false));
        assert_eq!(route(b"GET /metrics\r\n\r\n"), (Status::BadRequest, false));
        assert_eq!(route(b"GET  /metrics HTTP/1.1\r\n\r\n"), (Status::BadRequest, false));
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), (Status::BadRequest, false));
        assert_eq!(route(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"), (Status::BadRequest, false));
        assert_eq!(route(b""), (Status::BadRequest, false));
    }

    #[test]
    fn heads_end_at_a_blank_line() {
        assert!(head_complete(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.1\n\n"));
        assert!(!head_complete(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"));
        assert!(!head_complete(b""));
    }
}
