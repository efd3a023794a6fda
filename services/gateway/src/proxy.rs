//! The proxy path: classify → admit → authenticate/authorize → rate-limit → forward (streaming) → respond.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{
        HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
        uri::{Authority, PathAndQuery, Scheme},
    },
    response::IntoResponse,
};
use bytes::Bytes;
use cqrs_common::Problem;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use prometheus::IntCounterVec;
use tokio::sync::Semaphore;

use crate::{
    auth::{AuthError, Principal, Verifier, authorize, is_admin_path, required_role},
    headers::{
        TRACEPARENT, X_AUTH_ROLE, X_AUTH_SUBJECT, X_FORWARDED_FOR, X_FORWARDED_HOST,
        X_FORWARDED_PROTO, X_REQUEST_ID, request_id, strip_hop_by_hop, traceparent,
    },
    metrics::Metrics,
    ratelimit::RateLimiter,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type UpstreamClient = Client<HttpConnector, ProxyBody>;

/// What kind of route a request is, for timeouts, metrics and authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// `GET`/`HEAD` answered with one response.
    Read,
    /// `GET …/stream` or `Accept: text/event-stream`: Server-Sent Events, exempt from the total timeout.
    Stream,
    /// Any other method outside `/admin`.
    Command,
    /// `/admin/*`, any method.
    Admin,
}

impl RouteClass {
    pub fn of(method: &Method, path: &str, headers: &HeaderMap) -> Self {
        if is_admin_path(path) {
            RouteClass::Admin
        } else if method == Method::GET || method == Method::HEAD {
            let last = path.trim_end_matches('/').rsplit('/').next();
            let wants_sse = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/event-stream"));
            if last == Some("stream") || wants_sse {
                RouteClass::Stream
            } else {
                RouteClass::Read
            }
        } else {
            RouteClass::Command
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Read => "read",
            RouteClass::Stream => "stream",
            RouteClass::Command => "command",
            RouteClass::Admin => "admin",
        }
    }
}

/// A bounded label for the method (arbitrary extension methods would explode metric cardinality).
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// An upstream base URL, split once at startup.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: &'static str,
    scheme: Scheme,
    authority: Authority,
    /// Path prefix of the base URL without a trailing slash (usually empty).
    prefix: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{name} URL `{url}` must be an absolute http:// URL ({reason})")]
pub struct UpstreamUrlError {
    name: &'static str,
    url: String,
    reason: String,
}

impl Upstream {
    pub fn parse(name: &'static str, url: &str) -> Result<Self, UpstreamUrlError> {
        let err = |reason: &str| UpstreamUrlError {
            name,
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| err(&e.to_string()))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| err("no scheme"))?;
        if scheme != Scheme::HTTP {
            return Err(err(
                "only http is supported; TLS terminates in front of the gateway",
            ));
        }
        let authority = uri.authority().cloned().ok_or_else(|| err("no host"))?;
        if uri.query().is_some() {
            return Err(err("a base URL cannot have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            name,
            scheme,
            authority,
            prefix,
        })
    }

    fn uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, axum::http::Error> {
        let pq = pq.map_or("/", |p| p.as_str());
        let builder = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        if self.prefix.is_empty() {
            builder.path_and_query(pq).build()
        } else {
            builder
                .path_and_query(format!("{}{pq}", self.prefix))
                .build()
        }
    }

    /// `GET <base>/readyz` answers 2xx.
    pub async fn ready(&self, client: &UpstreamClient) -> Result<(), String> {
        let uri = self
            .uri(Some(&PathAndQuery::from_static("/readyz")))
            .map_err(|e| e.to_string())?;
        let mut req = Request::new(ProxyBody::Empty);
        *req.uri_mut() = uri;
        let res = client
            .request(req)
            .await
            .map_err(|e| format!("{}: {}", self.name, error_chain(&e)))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("{} /readyz answered {}", self.name, res.status()))
        }
    }
}

/// Why a proxied request did not get an upstream response. Every variant becomes a problem+json response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("too many requests from this client")]
    RateLimited { retry_after: Duration },
    #[error("the gateway is handling too many requests; retry shortly")]
    Overloaded,
    #[error("the {upstream} service is unavailable")]
    Unavailable {
        upstream: &'static str,
        cause: String,
    },
    #[error("the {upstream} service failed to answer")]
    BadGateway {
        upstream: &'static str,
        cause: String,
    },
    #[error("the {upstream} service did not answer within {timeout:?}")]
    Timeout {
        upstream: &'static str,
        timeout: Duration,
    },
    #[error("the request body could not be read from the client")]
    ClientBody,
    #[error("the {0} method is not supported by this API")]
    MethodNotAllowed(Method),
    #[error("the request target cannot be forwarded: {0}")]
    BadTarget(String),
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> axum::response::Response {
        let detail = self.to_string();
        match self {
            ProxyError::Auth(e) => return e.into_response(),
            ProxyError::TooLarge { .. } => {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", detail)
            }
            ProxyError::RateLimited { retry_after } => {
                Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", detail)
                    .with_retry_after(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            ProxyError::Overloaded => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", detail)
                    .with_retry_after(1)
            }
            ProxyError::Unavailable { .. } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-unavailable",
                detail,
            )
            .with_retry_after(1),
            ProxyError::BadGateway { .. } => {
                Problem::new(StatusCode::BAD_GATEWAY, "bad-gateway", detail)
            }
            ProxyError::Timeout { .. } => {
                Problem::new(StatusCode::GATEWAY_TIMEOUT, "upstream-timeout", detail)
            }
            ProxyError::ClientBody => Problem::bad_request(detail),
            ProxyError::MethodNotAllowed(_) => {
                Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", detail)
            }
            ProxyError::BadTarget(_) => Problem::bad_request(detail),
        }
        .into_response()
    }
}

/// Responses up to this size with a declared `Content-Length` are collected before being sent on.
const SMALL_RESPONSE: u64 = 16 * 1024;

/// Request-body state shared between the streaming body (inside the client) and the handler.
const BODY_OK: u8 = 0;
const BODY_TOO_LARGE: u8 = 1;
const BODY_CLIENT_ERROR: u8 = 2;

/// The body sent upstream: nothing, or the client's body streamed through a byte cap.
pub enum ProxyBody {
    Empty,
    Limited {
        inner: Incoming,
        remaining: u64,
        state: Arc<AtomicU8>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
struct BodyTooLarge;

impl HttpBody for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Limited {
                inner,
                remaining,
                state,
            } => match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let n = data.len() as u64;
                        if n > *remaining {
                            state.store(BODY_TOO_LARGE, Ordering::Release);
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                        }
                        *remaining -= n;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => {
                    state.store(BODY_CLIENT_ERROR, Ordering::Release);
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Limited { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Limited { inner, .. } => inner.size_hint(),
        }
    }
}

/// The upstream's response body on its way to the client, cut off at the route's deadline (none for SSE).
struct ResponseBody {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    errors: IntCounterVec,
    upstream: &'static str,
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream response body did not finish before the route's deadline")]
struct BodyDeadline;

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.errors
                    .with_label_values(&[this.upstream, "body"])
                    .inc();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    this.errors
                        .with_label_values(&[this.upstream, "body_timeout"])
                        .inc();
                    return Poll::Ready(Some(Err(Box::new(BodyDeadline))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Everything the proxy path needs, shared by all connections.
pub struct Gateway {
    pub client: UpstreamClient,
    pub mutation: Upstream,
    pub query: Upstream,
    /// `None` when auth is disabled.
    pub verifier: Option<Verifier>,
    pub rate_limiter: Option<RateLimiter>,
    pub in_flight: Semaphore,
    pub max_body_bytes: u64,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub admin_timeout: Duration,
    pub metrics: Metrics,
}

struct InFlight<'a>(&'a Metrics);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl Gateway {
    /// Proxies one request; never fails (errors become problem+json responses). Every response carries
    /// `X-Request-Id`.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let start = Instant::now();
        let rid = request_id(req.headers());
        let method = method_label(req.method());
        let class = RouteClass::of(req.method(), req.uri().path(), req.headers());
        let mut res = match self.forward(req, peer, class, &rid).await {
            Ok(res) => res,
            Err(e) => {
                self.record(&e, &rid);
                e.into_response()
            }
        };
        let elapsed = start.elapsed();
        tracing::debug!(
            request_id = ?rid,
            method,
            route = class.as_str(),
            status = res.status().as_u16(),
            elapsed_us = elapsed.as_micros() as u64,
            "proxied"
        );
        res.headers_mut().insert(X_REQUEST_ID.clone(), rid);
        self.metrics
            .duration
            .with_label_values(&[class.as_str(), method])
            .observe(elapsed.as_secs_f64());
        self.metrics
            .requests
            .with_label_values(&[class.as_str(), method, res.status().as_str()])
            .inc();
        res
    }

    fn record(&self, e: &ProxyError, rid: &HeaderValue) {
        let m = &self.metrics;
        match e {
            ProxyError::Auth(a) => {
                m.auth_failures.with_label_values(&[a.reason()]).inc();
                tracing::debug!(request_id = ?rid, reason = a.reason(), "refused: {a}");
            }
            ProxyError::TooLarge { .. } => m.too_large.inc(),
            ProxyError::RateLimited { .. } => m.rate_limited.inc(),
            ProxyError::Overloaded => m.shed.inc(),
            ProxyError::Unavailable { upstream, cause } => {
                m.upstream_errors
                    .with_label_values(&[upstream, "connect"])
                    .inc();
                tracing::warn!(request_id = ?rid, upstream, cause, "upstream unavailable");
            }
            ProxyError::BadGateway { upstream, cause } => {
                m.upstream_errors
                    .with_label_values(&[upstream, "reset"])
                    .inc();
                tracing::warn!(request_id = ?rid, upstream, cause, "upstream failed");
            }
            ProxyError::Timeout { upstream, timeout } => {
                m.upstream_errors
                    .with_label_values(&[upstream, "timeout"])
                    .inc();
                tracing::warn!(request_id = ?rid, upstream, ?timeout, "upstream timed out");
            }
            ProxyError::ClientBody | ProxyError::BadTarget(_) | ProxyError::MethodNotAllowed(_) => {
            }
        }
    }

    /// The checks made before any byte of the body is read: method, authentication, authorization, rate limit
    /// and the declared body size.
    fn admit(&self, req: &Request<Incoming>, peer: SocketAddr) -> Result<Principal, ProxyError> {
        // CONNECT would turn the gateway into a tunnel, TRACE reflects headers (cross-site tracing).
        if req.method() == Method::CONNECT || req.method() == Method::TRACE {
            return Err(ProxyError::MethodNotAllowed(req.method().clone()));
        }

        let principal = match &self.verifier {
            None => Principal::anonymous_admin(),
            Some(v) => {
                let p = v.authenticate(req.headers())?;
                authorize(&p, required_role(req.method(), req.uri().path()))?;
                p
            }
        };

        if let Some(rl) = &self.rate_limiter {
            let key = match &principal.subject {
                Some(sub) if self.verifier.is_some() => format!("sub:{sub}"),
                _ => format!("ip:{}", peer.ip()),
            };
            rl.check(&key, Instant::now())
                .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;
        }

        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            return Err(ProxyError::TooLarge {
                limit: self.max_body_bytes,
            });
        }
        Ok(principal)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        class: RouteClass,
        rid: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| ProxyError::Overloaded)?;
        self.metrics.in_flight.inc();
        let _in_flight = InFlight(&self.metrics);

        let principal = match self.admit(&req, peer) {
            Ok(p) => p,
            Err(e) => {
                // Refused before reading the body: read and discard what the client is already sending
                // (bounded), or closing the socket with unread data makes the kernel answer with a reset,
                // and the client sees "connection reset" instead of our 401/403/413.
                discard_unread(req.into_body(), DISCARD_CAP_BYTES, DISCARD_WITHIN).await;
                return Err(e);
            }
        };

        let (parts, body) = req.into_parts();
        let is_read = parts.method == Method::GET || parts.method == Method::HEAD;
        // `/admin/*` belongs to query (DLQ and projection rebuilds), whatever the method; mutation has no
        // admin routes.
        let upstream = if is_read || class == RouteClass::Admin {
            &self.query
        } else {
            &self.mutation
        };
        let uri = upstream
            .uri(parts.uri.path_and_query())
            .map_err(|e| ProxyError::BadTarget(e.to_string()))?;
        let mut headers = parts.headers;
        let host = headers.remove(header::HOST);
        strip_hop_by_hop(&mut headers);
        headers.remove(header::EXPECT);
        headers.remove(&X_AUTH_SUBJECT);
        headers.remove(&X_AUTH_ROLE);
        if self.verifier.is_some() {
            if let Some(v) = principal
                .subject
                .as_deref()
                .and_then(|s| HeaderValue::from_str(s).ok())
            {
                headers.insert(X_AUTH_SUBJECT.clone(), v);
            }
            if let Some(role) = principal.role {
                headers.insert(X_AUTH_ROLE.clone(), HeaderValue::from_static(role.as_str()));
            }
        }
        let client_ip = peer.ip().to_string();
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {client_ip}"),
            None => client_ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        }
        if let Some(h) = host
            && !headers.contains_key(&X_FORWARDED_HOST)
        {
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
        headers.insert(X_REQUEST_ID.clone(), rid.clone());
        let tp = traceparent(&headers);
        headers.insert(TRACEPARENT.clone(), tp);

        let state = Arc::new(AtomicU8::new(BODY_OK));
        let empty_body = body.is_end_stream();
        // Only a bodiless read may be sent twice, and only when the first attempt never connected.
        let retry_headers = (is_read && empty_body).then(|| headers.clone());
        let body = if empty_body {
            ProxyBody::Empty
        } else {
            ProxyBody::Limited {
                inner: body,
                remaining: self.max_body_bytes,
                state: state.clone(),
            }
        };
        let upstream_req = build(parts.method.clone(), uri.clone(), headers, body);

        let timeout = match class {
            RouteClass::Read | RouteClass::Stream => self.read_timeout,
            RouteClass::Command => self.write_timeout,
            RouteClass::Admin => self.admin_timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || ProxyError::Timeout {
            upstream: upstream.name,
            timeout,
        };

        let mut result = tokio::time::timeout_at(deadline, self.client.request(upstream_req))
            .await
            .map_err(|_| timed_out())?;
        if let (Err(e), Some(headers)) = (&result, retry_headers)
            && e.is_connect()
        {
            self.metrics
                .retries
                .with_label_values(&[upstream.name])
                .inc();
            tracing::debug!(request_id = ?rid, upstream = upstream.name, "connect failed, retrying read once");
            let again = build(parts.method, uri, headers, ProxyBody::Empty);
            result = tokio::time::timeout_at(deadline, self.client.request(again))
                .await
                .map_err(|_| timed_out())?;
        }
        match state.load(Ordering::Acquire) {
            BODY_TOO_LARGE => {
                return Err(ProxyError::TooLarge {
                    limit: self.max_body_bytes,
                });
            }
            BODY_CLIENT_ERROR => return Err(ProxyError::ClientBody),
            _ => {}
        }
        let res = result.map_err(|e| {
            let cause = error_chain(&e);
            if e.is_connect() {
                ProxyError::Unavailable {
                    upstream: upstream.name,
                    cause,
                }
            } else {
                ProxyError::BadGateway {
                    upstream: upstream.name,
                    cause,
                }
            }
        })?;

        let (mut rparts, rbody) = res.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        let declared = rparts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if class != RouteClass::Stream && declared.is_some_and(|n| n <= SMALL_RESPONSE) {
            // Small, declared-length bodies (the typical JSON answer) are collected first, so head and body
            // leave in one write and a body that stalls can still be answered with a clean 504. Anything
            // larger, unsized or SSE streams through.
            let body = tokio::time::timeout_at(deadline, rbody.collect())
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| ProxyError::BadGateway {
                    upstream: upstream.name,
                    cause: error_chain(&e),
                })?;
            return Ok(Response::from_parts(rparts, Body::from(body.to_bytes())));
        }
        let body = ResponseBody {
            inner: rbody,
            deadline: (class != RouteClass::Stream)
                .then(|| Box::pin(tokio::time::sleep_until(deadline))),
            errors: self.metrics.upstream_errors.clone(),
            upstream: upstream.name,
        };
        Ok(Response::from_parts(rparts, Body::new(body)))
    }
}

/// How much of a refused request's body is read and thrown away, and for how long, before the connection closes.
const DISCARD_CAP_BYTES: u64 = 16 << 20;
const DISCARD_WITHIN: Duration = Duration::from_secs(5);

/// Reads and drops up to `cap` bytes of `body` within `within`; stops early at the end of the body.
async fn discard_unread(mut body: Incoming, cap: u64, within: Duration) {
    let mut seen: u64 = 0;
    let _ = tokio::time::timeout(within, async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > cap {
                    break;
                }
            }
        }
    })
    .await;
}

fn build(method: Method, uri: Uri, headers: HeaderMap, body: ProxyBody) -> Request<ProxyBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// "a: b: c" from an error and its sources, for logs and readiness messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let h = HeaderMap::new();
        assert_eq!(
            RouteClass::of(&Method::GET, "/product/1", &h),
            RouteClass::Read
        );
        assert_eq!(
            RouteClass::of(&Method::GET, "/product/1/stream", &h),
            RouteClass::Stream
        );
        assert_eq!(
            RouteClass::of(&Method::GET, "/stream", &h),
            RouteClass::Stream
        );
        assert_eq!(
            RouteClass::of(&Method::POST, "/product", &h),
            RouteClass::Command
        );
        assert_eq!(
            RouteClass::of(&Method::GET, "/admin/dlq", &h),
            RouteClass::Admin
        );
        let mut sse = HeaderMap::new();
        sse.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        assert_eq!(
            RouteClass::of(&Method::GET, "/sync-status", &sse),
            RouteClass::Stream
        );
    }

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("query", "http://q:3125/base/").expect("valid");
        let pq = PathAndQuery::from_static("/product/1?x=1");
        assert_eq!(
            u.uri(Some(&pq)).expect("uri").to_string(),
            "http://q:3125/base/product/1?x=1"
        );
        assert!(Upstream::parse("query", "https://q").is_err());
        assert!(Upstream::parse("query", "q:3125").is_err());
    }
}
