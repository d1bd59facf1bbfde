//! `webhook`: POST a JSON body to a URL, the model for calls to enrichment
//! providers. A token bucket per workspace and host paces the calls (an
//! empty bucket snoozes the job, using no attempt; one tenant's burst never
//! spends another's calls); 5xx, 408, 429, timeouts and
//! connection errors are retried with backoff; other 4xx are permanent.
//! Addresses that resolve to loopback, private, link-local or otherwise
//! internal ranges (IPv6 ranges that tunnel or translate to IPv4 included)
//! are refused unless the deployment allows them, and the request goes to
//! the address that was checked (no DNS rebinding, no proxy), with
//! redirects not followed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::ratelimit;

/// Calls to one host per second, sustained; the burst is the same number.
const PER_HOST_PER_SEC: f64 = 10.0;
const MAX_RESPONSE_KEPT: usize = 4096;
/// Most of a response body read. The rest is never read: the connection is
/// dropped, so an endpoint streaming without end costs this much memory and
/// no more.
const MAX_RESPONSE_READ: usize = 64 * 1024;

/// The `webhook` handler; `allow_private` lets it call internal addresses
/// (tests, or a deployment whose hooks live on its own network).
#[derive(Clone, Copy, Debug, Default)]
pub struct Webhook {
    pub allow_private: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookPayload {
    pub url: String,
    #[serde(default)]
    pub body: Value,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// 100..=30000, default 10000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_timeout() -> u64 {
    10_000
}

/// Whether an address is one a webhook must not reach by default.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal(IpAddr::V4(v4)))
                // IPv4-compatible (`::a.b.c.d`, deprecated; some stacks still
                // route it as the IPv4 address), documentation (2001:db8::/32)
                // and discard-only (100::/64) addresses are never a hook's.
                || (s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1))
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0100 && s[1..4] == [0; 3])
                // The ranges below carry an IPv4 address a gateway or relay
                // sends the traffic on to, out of sight of the checks above.
                // The well-known NAT64 prefix holds it in its last 32 bits
                // (RFC 6052), and a gateway sends to exactly that address, so
                // it is judged as that address: refusing the prefix whole
                // would refuse every IPv4-only host on a DNS64 network (an
                // IPv6-only subnet), where every such name resolves into it.
                // The others are refused whole: a local-use NAT64 prefix may
                // embed the address anywhere, and 6to4 and Teredo are
                // deprecated, so no legitimate hook needs them.
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] // NAT64, 64:ff9b::/96
                    && is_internal(IpAddr::V4(std::net::Ipv4Addr::from(
                        (u32::from(s[6]) << 16) | u32::from(s[7]),
                    ))))
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64, 64:ff9b:1::/48
                || s[0] == 0x2002 // 6to4, 2002::/16
                || (s[0] == 0x2001 && s[1] == 0) // Teredo, 2001::/32
        }
    }
}

/// `s` as an http or https URL with a host; otherwise what is wrong with it.
pub(crate) fn http_url(s: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("an http or https URL with a host".into());
    }
    Ok(url)
}

/// A client for `url`'s host that connects only to the addresses resolved
/// and checked here (no DNS rebinding, no proxy from the environment) and
/// follows no redirects. Addresses
/// in internal ranges are refused unless `allow_private`; `who` names the
/// callers in that refusal.
pub(crate) async fn pinned_client(
    url: &reqwest::Url,
    allow_private: bool,
    timeout: Duration,
    user_agent: &str,
    who: &str,
) -> Result<reqwest::Client, JobError> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(a) => a.collect(),
        Err(e) => return Err(JobError::Retryable(format!("cannot resolve {host}: {e}"))),
    };
    if addrs.is_empty() {
        return Err(JobError::Retryable(format!("{host} has no address")));
    }
    if !allow_private {
        if let Some(a) = addrs.iter().find(|a| is_internal(a.ip())) {
            return Err(JobError::Permanent(format!(
                "refused: {host} resolves to {}, an internal address; {who} may only call public addresses",
                a.ip()
            )));
        }
    }
    reqwest::Client::builder()
        .resolve_to_addrs(host, &addrs)
        // A proxy (HTTP(S)_PROXY, ALL_PROXY) would resolve the host itself
        // and connect wherever that leads, not to the addresses checked.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(user_agent)
        .build()
        .map_err(|e| JobError::Retryable(format!("http client: {}", error_text(e))))
}

#[async_trait]
impl JobHandler for Webhook {
    type Payload = WebhookPayload;
    const TYPE: &'static str = "webhook";

    fn validate(&self, p: &WebhookPayload) -> Result<(), PayloadError> {
        http_url(&p.url).map_err(|e| PayloadError::field("url", e))?;
        if p.url.len() > 2048 {
            return Err(PayloadError::field("url", "at most 2048 characters"));
        }
        if !(100..=30_000).contains(&p.timeout_ms) {
            return Err(PayloadError::field(
                "timeout_ms",
                "must be from 100 to 30000",
            ));
        }
        if p.headers.len() > 20 {
            return Err(PayloadError::field("headers", "at most 20 headers"));
        }
        for (k, v) in &p.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(v).is_err()
            {
                return Err(PayloadError::field(
                    &format!("headers.{k}"),
                    "not a valid header",
                ));
            }
        }
        Ok(())
    }

    async fn run(&self, p: WebhookPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let url = http_url(&p.url).map_err(|e| JobError::Permanent(format!("bad url: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_string();
        let client = pinned_client(
            &url,
            self.allow_private,
            Duration::from_millis(p.timeout_ms),
            "Offload-Webhook/1",
            "webhooks",
        )
        .await?;
        if !ctx
            .take_token(
                &format!("webhook:{}:{host}", ctx.workspace_id()),
                PER_HOST_PER_SEC,
                PER_HOST_PER_SEC,
            )
            .await?
        {
            return Ok(Outcome::Snooze(ratelimit::wait_for_token(PER_HOST_PER_SEC)));
        }
        // Every attempt of a job carries the same key, so a receiver can drop
        // the repeat that at-least-once delivery allows (a worker that dies
        // after the call and before recording it calls again).
        let mut req = client
            .post(url.clone())
            .json(&p.body)
            .header("offload-job-id", ctx.job_id().to_string())
            .header("offload-attempt", ctx.attempt().to_string());
        if !p
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("idempotency-key"))
        {
            req = req.header("idempotency-key", ctx.job_id().to_string());
        }
        for (k, v) in &p.headers {
            req = req.header(k, v);
        }
        let started = std::time::Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(JobError::Retryable(format!(
                    "{host} did not answer within {} ms",
                    p.timeout_ms
                )))
            }
            // The error's text would carry the URL, whose path or query
            // often holds the hook's secret.
            Err(e) => {
                return Err(JobError::Retryable(format!(
                    "cannot reach {host}: {}",
                    error_text(e)
                )))
            }
        };
        let status = resp.status();
        let (body, truncated) = read_capped(resp, MAX_RESPONSE_READ).await;
        let text = String::from_utf8_lossy(&body);
        let kept: String = text.chars().take(MAX_RESPONSE_KEPT).collect();
        let truncated = truncated || text.chars().count() > MAX_RESPONSE_KEPT;
        let ms = started.elapsed().as_millis() as u64;
        if status.is_success() {
            ctx.log("info", format!("{host} answered {status} in {ms} ms"), None)
                .await?;
            let mut result = json!({ "status": status.as_u16(), "response": kept, "ms": ms });
            if truncated {
                result["truncated"] = json!(true);
            }
            return Ok(Outcome::Completed(Some(result)));
        }
        let msg = format!(
            "{host} answered {status}: {}",
            kept.chars().take(200).collect::<String>()
        );
        if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(JobError::Retryable(msg))
        } else if status.is_redirection() {
            Err(JobError::Permanent(format!(
                "{msg} (redirects are not followed)"
            )))
        } else {
            Err(JobError::Permanent(msg))
        }
    }
}

/// What went wrong in a call, with its causes (the refused connection, the
/// failed handshake) but without the URL, whose path or query often holds
/// a secret (Slack's and Discord's hooks keep it in the path).
pub(crate) fn error_text(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Reads at most `cap` bytes of a response body; whether there was more.
/// A body that fails part way (a timeout while it trickles) keeps what came.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = cap - body.len();
                if chunk.len() >= room {
                    body.extend_from_slice(&chunk[..room]);
                    return (body, true);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return (body, false),
            Err(_) => return (body, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn translated_and_tunnelled_ipv6_addresses_count_as_internal() {
        // A NAT64 gateway, a 6to4 relay or a Teredo server turns these into
        // IPv4 traffic whose destination the plain checks never see.
        for ip in [
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
            "64:ff9b::7f00:1",    // NAT64 of 127.0.0.1
            "64:ff9b:1::a00:1",   // local-use NAT64
            "64:ff9b:1:ffff::1",
            "2002:a9fe:a9fe::1", // 6to4 of 169.254.169.254
            "2002:808:808::1",
            "2001::1", // Teredo
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::7f00:1",    // IPv4-compatible 127.0.0.1
            "::808:808",   // IPv4-compatible, deprecated whatever it holds
            "2001:db8::1", // documentation
            "100::1",      // discard-only
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        // Neighbours of those ranges are ordinary public addresses, and so is
        // a NAT64 address of a public IPv4 (what DNS64 answers for any
        // IPv4-only host).
        for ip in [
            "64:ff9b:2::1",
            "2003::1",
            "2001:4860:4860::8888",
            "64:ff9b::808:808",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }
}
