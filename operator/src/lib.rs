//! The CqrsStack operator: the custom resource, the pure validate/build steps and the controller.
pub mod build;
pub mod controller;
pub mod crd;
pub mod metrics;
pub mod rebuild;
pub mod validate;

pub use controller::{Config, run};
pub use metrics::Metrics;
