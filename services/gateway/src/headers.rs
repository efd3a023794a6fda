//! Header hygiene: hop-by-hop stripping, request ids, W3C trace context, forwarding headers.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Set by the gateway from a verified token; a client-sent value is always removed.
pub static X_AUTH_SUBJECT: HeaderName = HeaderName::from_static("x-auth-subject");
/// Set by the gateway from a verified token; a client-sent value is always removed.
pub static X_AUTH_ROLE: HeaderName = HeaderName::from_static("x-auth-role");

/// RFC 9110 §7.6.1 connection-specific headers, plus the non-standard ones proxies traditionally drop.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection first (they must go even when not in the fixed list).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        // The gateway's own headers (request id, trace context, forwarding) are set after this runs.
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// The client's `X-Request-Id` when it is sane (1..=128 visible ASCII chars), else a fresh UUID v4.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or(HeaderValue::from_static("invalid"))
}

/// The `traceparent` to send upstream: the client's trace id and flags with the gateway as the new parent
/// span, or a new trace when the client sent none or a malformed one (W3C Trace Context level 1).
pub fn traceparent(headers: &HeaderMap) -> HeaderValue {
    // A thread-local CSPRNG (rand's ThreadRng): ids need uniqueness, not a getrandom syscall per request.
    let mut span: [u8; 8] = rand::random();
    span[7] |= 1; // never the invalid all-zero id
    let (trace, flags) = match headers
        .get(&TRACEPARENT)
        .and_then(|v| parse_traceparent(v.as_bytes()))
    {
        Some((trace, flags)) => (trace, flags),
        None => {
            let mut trace: [u8; 16] = rand::random();
            trace[15] |= 1;
            (trace, 0x01)
        }
    };
    let s = format!("00-{}-{}-{:02x}", hex(&trace), hex(&span), flags);
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("invalid"))
}

/// `version-traceid-parentid-flags`; rejects version ff, all-zero ids and non-lowercase-hex.
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], u8)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut parts = s.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let lower_hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    if !lower_hex(version, 2)
        || version == "ff"
        || !lower_hex(trace, 32)
        || !lower_hex(parent, 16)
        || !lower_hex(flags, 2)
    {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).ok()?;
    }
    if id == [0; 16] || parent.bytes().all(|c| c == b'0') {
        return None;
    }
    Some((id, u8::from_str_radix(flags, 16).ok()?))
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("trailer", "x"),
            ("x-secret", "1"),
            ("x-kept", "1"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn request_ids_are_propagated_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
    }

    #[test]
    fn traceparent_keeps_the_trace_and_replaces_the_parent() {
        let mut h = HeaderMap::new();
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let tp = traceparent(&h);
        let s = tp.to_str().expect("ascii");
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{s}");
        assert!(!s.contains("00f067aa0ba902b7"));
        assert!(s.ends_with("-01"));
        assert!(parse_traceparent(s.as_bytes()).is_some());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "junk",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        let fresh = traceparent(&HeaderMap::new());
        assert!(parse_traceparent(fresh.as_bytes()).is_some());
    }
}
