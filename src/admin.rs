//! The stats endpoint: Prometheus metrics over plain HTTP on its own
//! thread, so a slow or hostile scraper never touches a worker.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics;
use crate::server::Frontend;

/// Binds now (so a busy port is a start-up error), serves in the background.
pub fn serve(addr: SocketAddr, frontends: Vec<Arc<Frontend>>) -> std::io::Result<SocketAddr> {
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

fn answer(mut stream: TcpStream, frontends: &[Arc<Frontend>]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    // The request line may come in pieces: read until it is whole.
    let mut request = [0u8; 1024];
    let mut n = 0;
    while n < request.len() && !request[..n].windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut request[n..]) {
            Ok(0) | Err(_) => break,
            Ok(read) => n += read,
        }
    }
    let head = String::from_utf8_lossy(&request[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/metrics" | "/" => ("200 OK", metrics::render(frontends)),
        _ => ("404 Not Found", "try /metrics\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}
