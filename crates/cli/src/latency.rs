//! `ws-gateway latency`: asks a running gateway's `/latency` for the probe
//! and real traffic, over the last minute and the last hour, and prints one
//! table. Plain HTTP (reqwest): the gateway serves no TLS.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

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

/// `http://host[:port][/prefix]`: where the gateway's HTTP side is.
#[derive(Debug)]
struct BaseUrl {
    /// The URL without a trailing slash; paths are appended to it.
    base: String,
    /// `host:port`, for messages.
    address: String,
    client: reqwest::Client,
}

impl BaseUrl {
    fn parse(url: &str) -> anyhow::Result<BaseUrl> {
        if !url.starts_with("http://") {
            bail!("--url {url:?}: expected http://host:port (the gateway serves plain HTTP)");
        }
        let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url:?}"))?;
        let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
            bail!("--url {url:?}: no host");
        };
        let port = parsed.port_or_known_default().unwrap_or(80);
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(BaseUrl {
            base: format!("{}{}", parsed.origin().ascii_serialization(), parsed.path())
                .trim_end_matches('/')
                .to_owned(),
            address: format!("{host}:{port}"),
            client,
        })
    }

    /// GETs `path` (with its query): the status and the body as JSON
    /// (`null` when it is not JSON).
    async fn get_json(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    anyhow!("no answer from {} within {TIMEOUT:?}", self.address)
                } else {
                    anyhow!(e).context(format!(
                        "cannot reach ws-gateway at {}: is it running? (--url sets where)",
                        self.address
                    ))
                }
            })?;
        let status = response.status().as_u16();
        let body = response.text().await.context("reading the answer")?;
        Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let b = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(b.address, "127.0.0.1:8080");
        assert_eq!(b.base, "http://127.0.0.1:8080");
        let b = BaseUrl::parse("http://gw.internal/realtime/").unwrap();
        assert_eq!(b.address, "gw.internal:80");
        assert_eq!(b.base, "http://gw.internal/realtime");
        assert_eq!(BaseUrl::parse("http://[::1]").unwrap().address, "[::1]:80");
        assert_eq!(BaseUrl::parse("http://[::1]:9000").unwrap().address, "[::1]:9000");
        assert!(BaseUrl::parse("https://x").is_err());
        assert!(BaseUrl::parse("http://").is_err());
    }

    #[test]
    fn rows_show_dashes_for_empty_windows() {
        let empty = serde_json::json!({"count": 0, "p50_ms": null});
        assert!(row("ack", &empty).contains('–'));
        let full = serde_json::json!({"count": 3, "p50_ms": 1.5, "p95_ms": 2.0, "p99_ms": 2.25, "max_ms": 2.25});
        assert!(row("probe", &full).contains("2.250"));
    }
}
