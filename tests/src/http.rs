//! Plain HTTP/1.1 for the tests of the HTTP API and `/metrics`: a request over a bare TCP
//! stream (bounded), and a Prometheus sample read out of the text served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One HTTP/1.1 request on a fresh connection to `address`, with an optional bearer key and a
/// JSON `body`, each read bounded by `within`: the status line's code and the body's bytes
/// (chunked encoding undone).
pub fn http_request(address: &str, method: &str, path: &str, key: Option<&str>, body: &str, within: Duration) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(address).unwrap_or_else(|e| panic!("connect {address}: {e}"));
    s.set_read_timeout(Some(within)).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("reading {method} {path} from {address}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response from {address}: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"));
    let body = &raw[split + 4..];
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_vec() };
    (code, body)
}

/// A chunked body's chunks, joined; a malformed one fails the test.
fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").expect("a chunk-size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[line + 2..line + 2 + size]);
        b = &b[line + 2 + size + 2..];
    }
}

/// POST `body` (JSON) to `path` on `address` with an optional bearer key, bounded (60 s): the
/// status line's code and the body.
pub fn http_post(address: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let (code, body) = http_request(address, "POST", path, key, body, Duration::from_secs(60));
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// `GET path` on `address`, bounded (10 s): the status line's code and the body.
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    let (code, body) = http_request(address, "GET", path, None, "", Duration::from_secs(10));
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the Prometheus sample `name` whose labels include every `labels` pair, in the
/// text a `/metrics` endpoint served; `None` when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').map_or((series, ""), |(n, r)| (n, r));
        if n != name {
            return None;
        }
        labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}
