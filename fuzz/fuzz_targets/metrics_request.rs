//! Fuzzes the metrics HTTP server's request parsing
//! (`src/metrics/request.rs`), everything it reads off a scraper's socket:
//! the end-of-head scan and the request-line router.
//!
//! Asserts: no panic; a head routed to the page (200) has a request line
//! of exactly `GET` or `HEAD`, a target whose path is `/metrics` and an
//! `HTTP/1.x` version, and HEAD (no body) is reported only for HEAD; a
//! complete head stays complete with more bytes after it.

#![no_main]

use libfuzzer_sys::fuzz_target;

// Pure and free of crate imports, compiled here on its own like the NBD
// codec; its unit tests stay in the main crate.
#[allow(dead_code)]
#[path = "../../src/metrics/request.rs"]
mod request;
use request::{head_complete, route, Status};

fuzz_target!(|data: &[u8]| {
    let complete = head_complete(data);
    if complete {
        let mut more = data.to_vec();
        more.extend_from_slice(b"X: y\r\n");
        assert!(head_complete(&more));
    }
    let (status, head_only) = route(data);
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    match status {
        Status::Ok | Status::NotFound => {
            let line = std::str::from_utf8(line).expect("a routed request line is UTF-8");
            let parts: Vec<&str> = line.strip_suffix('\r').unwrap_or(line).split(' ').collect();
            assert_eq!(parts.len(), 3, "{line:?}");
            assert!(parts[0] == "GET" || parts[0] == "HEAD", "{line:?}");
            assert_eq!(head_only, parts[0] == "HEAD");
            assert!(parts[2].starts_with("HTTP/1."), "{line:?}");
            let path = parts[1].split('?').next().unwrap();
            assert_eq!(status == Status::Ok, path == "/metrics", "{line:?}");
        }
        Status::MethodNotAllowed | Status::BadRequest => assert!(!head_only),
        Status::HeadTooLarge | Status::Busy => panic!("route never answers {status:?}"),
    }
});
