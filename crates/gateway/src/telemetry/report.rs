//! `ws-gateway latency`: asks a running gateway's `/latency` for the probe
//! and real traffic, over the last minute and the last hour, and prints one
//! table. Plain HTTP/1.1 over a TCP socket: the gateway serves no TLS.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(5);

/// What `/latency` measures, as the table names it.
const SOURCES: [(&str, &str); 3] = [
    ("probe", "probe (commit → its own client)"),
    ("send", "send (commit → socket write)"),
    ("ack", "ack (commit → client ack)"),
];
const WINDOWS: [(&str, &str); 2] = [("60s", "last minute"), ("1h", "last hour")];

pub async fn print_latency(url: &str) -> anyhow::Result<()> {
    let base = BaseUrl::parse(url)?;
    let (_, health) = base.get_json("/healthz").await?;
    let mut out = String::new();
    out.push_str(&format!("ws-gateway at {url}"));
    if let Some(state) = health["feed"]["state"].as_str() {
        out.push_str(&format!(" · feed {state}"));
    }
    if let Some(offset) = health["feed"]["clock_offset_ms"].as_f64() {
        out.push_str(&format!(" · database clock {offset:+.3} ms"));
        if let Some(u) = health["feed"]["clock_uncertainty_ms"].as_f64() {
            out.push_str(&format!(" ± {u:.3}"));
        }
    }
    out.push_str("\n\ncommit → receive latency, milliseconds\n");
    out.push_str(&format!(
        "{:<36} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "", "count", "p50", "p95", "p99", "max"
    ));
    for (window, window_label) in WINDOWS {
        out.push_str(window_label);
        out.push('\n');
        for (source, label) in SOURCES {
            let (status, body) = base
                .get_json(&format!("/latency?window={window}&source={source}"))
                .await?;
            if status != 200 {
                bail!("{url}/latency answered {status}: {body}");
            }
            out.push_str(&row(label, &body));
        }
    }
    if health["feed"]["state"].is_null() {
        out.push_str("\n(no /healthz document: is this a ws-gateway?)\n");
    }
    print!("{out}");
    Ok(())
}

/// One line of the table.
fn row(label: &str, body: &Value) -> String {
    let num = |key: &str| match body[key].as_f64() {
        Some(v) => format!("{v:>9.3}"),
        None => format!("{:>9}", "–"),
    };
    format!(
        "  {label:<34} {:>9} {} {} {} {}\n",
        body["count"].as_u64().unwrap_or(0),
        num("p50_ms"),
        num("p95_ms"),
        num("p99_ms"),
        num("max_ms"),
    )
}

/// `http://host[:port][/prefix]`.
#[derive(Debug, PartialEq, Eq)]
struct BaseUrl {
    /// `host:port`, as `TcpStream::connect` takes it.
    address: String,
    host_header: String,
    prefix: String,
}

impl BaseUrl {
    fn parse(url: &str) -> anyhow::Result<BaseUrl> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--url {url:?}: expected http://host:port (the gateway serves plain HTTP)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("--url {url:?}: no host");
        }
        let has_port = match authority.rfind(']') {
            Some(bracket) => authority[bracket..].contains(':'),
            None => authority.contains(':'),
        };
        let address = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(BaseUrl {
            address,
            host_header: authority.to_owned(),
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let (status, body) = tokio::time::timeout(TIMEOUT, self.get(path))
            .await
            .map_err(|_| anyhow!("no answer from {} within {TIMEOUT:?}", self.address))??;
        let json = serde_json::from_str(&body).unwrap_or(Value::Null);
        Ok((status, json))
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect(&self.address).await.with_context(|| {
            format!(
                "cannot reach ws-gateway at {}: is it running? (--url sets where)",
                self.address
            )
        })?;
        let request = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            self.prefix, self.host_header
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        parse_response(&String::from_utf8_lossy(&response))
    }
}

/// Status and body of an HTTP/1.1 response (plain or chunked).
fn parse_response(response: &str) -> anyhow::Result<(u16, String)> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP response"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    Ok((status, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let b = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(b.address, "127.0.0.1:8080");
        assert_eq!(b.prefix, "");
        let b = BaseUrl::parse("http://gw.internal/realtime/").unwrap();
        assert_eq!(b.address, "gw.internal:80");
        assert_eq!(b.prefix, "/realtime");
        assert_eq!(BaseUrl::parse("http://[::1]").unwrap().address, "[::1]:80");
        assert_eq!(BaseUrl::parse("http://[::1]:9000").unwrap().address, "[::1]:9000");
        assert!(BaseUrl::parse("https://x").is_err());
        assert!(BaseUrl::parse("http://").is_err());
    }

    #[test]
    fn responses() {
        let plain = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".to_owned()));
        let chunked = "HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (400, "abcde".to_owned()));
    }

    #[test]
    fn rows_show_dashes_for_empty_windows() {
        let empty = serde_json::json!({"count": 0, "p50_ms": null});
        assert!(row("ack", &empty).contains('–'));
        let full = serde_json::json!({"count": 3, "p50_ms": 1.5, "p95_ms": 2.0, "p99_ms": 2.25, "max_ms": 2.25});
        assert!(row("probe", &full).contains("2.250"));
    }
}
