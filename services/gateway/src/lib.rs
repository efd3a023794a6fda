//! The gateway: the platform's edge (DESIGN.md §1, §5).
//!
//! A streaming reverse proxy: `GET`/`HEAD` go to query, every other method to mutation. Bodies stream in
//! both directions through a pooled keep-alive hyper client (nothing is buffered whole), Server-Sent Events pass
//! through unbuffered. In front of the upstreams it authenticates JWT bearer tokens and authorizes by role,
//! caps bodies, bounds connections and in-flight requests, applies per-route timeouts and an optional per-client
//! rate limit, and stamps request ids and W3C trace context.
//!
//! [`Application::build`] binds and wires everything; [`Application::run_until_stopped`] serves until the
//! shutdown future resolves, then drains.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod headers;
pub mod metrics;
pub mod mint;
pub mod proxy;
pub mod ratelimit;

pub use app::{Application, BuildError};
pub use auth::Role;
pub use config::{AuthSettings, Config, JwtSettings, RateLimit};
