//! A minimal HTTP/1.1 server for `GET /metrics`, on its own threads.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections are served at once
//! (more get 503 and are closed), a request head is at most
//! [`MAX_HEAD_BYTES`], and a client that does not send it within
//! [`READ_TIMEOUT`] is dropped. Every response closes the connection.
//! Rendering reads snapshots (`status`, counters), never the I/O path.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::request::{head_complete, route, Status};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 4;
/// Largest request head (request line and headers) read.
pub const MAX_HEAD_BYTES: usize = 8 << 10;
/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused request's input is drained before closing, so the
/// client reads the error instead of a reset.
const LINGER: Duration = Duration::from_millis(200);
/// Most input drained before closing.
const LINGER_BYTES: usize = 64 << 10;
/// Pause after a failing accept (EMFILE and the like), so it cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Renders the metrics page.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds the metrics listener (before anything else starts, so a taken
/// port fails early and clearly).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("metrics listener on {addr}: {e}")))
}

/// Serves `render` at `/metrics` on `listener` from a background thread;
/// returns the bound address.
pub fn serve(listener: TcpListener, render: Render) -> io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || accept_loop(listener, render))?;
    tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
    Ok(addr)
}

fn accept_loop(listener: TcpListener, render: Render) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                std::thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.set_write_timeout(Some(LINGER));
            let _ = respond(&stream, Status::Busy, "too many metrics connections\n", false);
            linger_close(&stream);
            continue;
        }
        let (render, active2) = (render.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
            if let Err(e) = handle(&stream, &render) {
                tracing::debug!("metrics connection: {e}");
            }
            active2.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("cannot start a metrics connection thread: {e}");
        }
    }
}

fn handle(stream: &TcpStream, render: &Render) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let head = match read_head(stream)? {
        Some(h) => h,
        None => {
            respond(stream, Status::HeadTooLarge, "request head too large\n", false)?;
            linger_close(stream);
            return Ok(());
        }
    };
    let (status, head_only) = route(&head);
    match status {
        Status::Ok => respond(stream, Status::Ok, &render(), head_only),
        Status::NotFound => respond(stream, status, "not found; metrics are at /metrics\n", head_only),
        Status::MethodNotAllowed => respond(stream, status, "only GET and HEAD\n", false),
        _ => respond(stream, status, "malformed request\n", false),
    }?;
    linger_close(stream);
    Ok(())
}

/// Ends our side, then reads (and drops) what the client still sends for
/// a moment: closing with unread input makes the kernel send a reset,
/// which can destroy the response before the client reads it.
fn linger_close(mut stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER));
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Reads up to the blank line ending the head; `None` when it exceeds
/// [`MAX_HEAD_BYTES`]. A GET has no body, so nothing after it is read.
fn read_head(mut stream: &TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the request ended"));
        }
        head.extend_from_slice(&buf[..n]);
        if head_complete(&head) {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Ok(None);
        }
    }
}

fn respond(mut stream: &TcpStream, status: Status, body: &str, head_only: bool) -> io::Result<()> {
    let kind =
        if status == Status::Ok { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain; charset=utf-8" };
    let allow = if status == Status::MethodNotAllowed { "Allow: GET, HEAD\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        status.line(),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = serve(listener, Arc::new(|| "starblk_x 1\n".to_string())).unwrap();
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("Content-Length: 12\r\n") && ok.ends_with("\r\n\r\nstarblk_x 1\n"), "{ok}");
        let head = get(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(get(addr, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let huge = [b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD_BYTES + 10]].concat();
        assert!(get(addr, &huge).starts_with("HTTP/1.1 431"));
    }

    #[test]
    fn connections_beyond_the_limit_get_503() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = serve(listener, Arc::new(|| "x 1\n".to_string())).unwrap();
        // Idle clients that never finish their request hold every slot.
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // The accept thread takes them in order; give it a moment to count them.
        let mut busy = String::new();
        for _ in 0..100 {
            busy = get(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
            if busy.starts_with("HTTP/1.1 503") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        drop(idle);
        let mut ok = String::new();
        for _ in 0..300 {
            ok = get(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
            if ok.starts_with("HTTP/1.1 200") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ok.starts_with("HTTP/1.1 200"), "slots are freed when clients leave: {ok}");
    }
}
