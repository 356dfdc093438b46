//! The stats endpoint: Prometheus metrics over plain HTTP on its own
//! thread, so a slow or hostile scraper never touches a worker.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics;
use crate::model::{Published, ReloadStats};

/// What the endpoint reads: the snapshot in force, and the control plane's
/// own counters.
#[derive(Clone)]
pub struct View {
    pub published: Arc<Published>,
    pub reloads: Arc<ReloadStats>,
}

/// Binds now (so a busy port is a start-up error), serves in the background.
pub fn serve(addr: SocketAddr, frontends: View) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("ringlb-stats".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream, &frontends);
            }
        })?;
    Ok(bound)
}

/// How long one scraper may take to send its request line: the endpoint
/// serves one connection at a time, so a slow client must not hold it.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

fn answer(mut stream: TcpStream, view: &View) {
    let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
    let request = read_request_line(&mut stream);
    let head = String::from_utf8_lossy(&request);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/metrics" | "/" => (
            "200 OK",
            metrics::render(&view.published.load(), &view.reloads),
        ),
        _ => ("404 Not Found", "try /metrics\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// The request line, which may come in pieces, up to its end of line (CRLF
/// or a bare LF), 1 KiB, end of stream or the deadline, whichever is first.
fn read_request_line(stream: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut request = vec![0u8; 1024];
    let mut n = 0;
    while n < request.len() && !request[..n].contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut request[n..]) {
            Ok(0) | Err(_) => break,
            Ok(read) => n += read,
        }
    }
    request.truncate(n);
    request
}
