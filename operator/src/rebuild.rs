//! Projection rebuilds, driven through the query service's admin API:
//! `POST {query}/admin/projections/rebuild {"generation":N}` (idempotent for the same N; another N cancels and
//! replaces) and `GET {query}/admin/projections` → `{"serving":G,"rebuild":{...}|null}`.
//!
//! The state that matters (serving and target generation) lives in the CqrsStack status and in the query
//! service, so an operator restart simply continues polling.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("query admin API at {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    /// Query answered and refused (4xx, e.g. 409: its serving generation is newer): retrying will not help.
    #[error("query admin API at {url} refused: HTTP {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionsState {
    pub serving: i64,
    #[serde(default)]
    pub rebuild: Option<RebuildState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildState {
    pub generation: i64,
    /// running | caughtUp | switched | cancelled | failed
    pub state: String,
    #[serde(default)]
    pub progress: Option<f64>,
    #[serde(default)]
    pub lag: Option<i64>,
}

#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    template: String,
}

impl AdminClient {
    /// `template` has `{name}` and `{namespace}` placeholders, e.g. `http://{name}-query.{namespace}.svc:3125`.
    pub fn new(template: impl Into<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(timeout).build()?,
            template: template.into(),
        })
    }

    pub fn base_url(&self, name: &str, namespace: &str) -> String {
        self.template
            .replace("{name}", name)
            .replace("{namespace}", namespace)
            .trim_end_matches('/')
            .to_owned()
    }

    /// GET `path` of the stack's query service, as JSON.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        namespace: &str,
        path: &str,
    ) -> Result<T, AdminError> {
        let url = format!("{}{path}", self.base_url(name, namespace));
        let fail = |source| AdminError::Http {
            url: url.clone(),
            source,
        };
        self.http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(fail)?
            .json()
            .await
            .map_err(fail)
    }

    pub async fn state(&self, name: &str, namespace: &str) -> Result<ProjectionsState, AdminError> {
        self.get_json(name, namespace, "/admin/projections").await
    }

    /// Messages the serving generation has not applied yet, from the query service's `/sync-status` (the
    /// committed offsets of its consumer group: the same for every replica).
    pub async fn serving_lag(
        &self,
        name: &str,
        namespace: &str,
    ) -> Result<Option<i64>, AdminError> {
        let v: serde_json::Value = self.get_json(name, namespace, "/sync-status").await?;
        Ok(serving_lag_of(&v))
    }

    pub async fn start(
        &self,
        name: &str,
        namespace: &str,
        generation: i64,
    ) -> Result<(), AdminError> {
        let url = format!(
            "{}/admin/projections/rebuild",
            self.base_url(name, namespace)
        );
        let fail = |source| AdminError::Http {
            url: url.clone(),
            source,
        };
        let res = self
            .http
            .post(&url)
            .json(&serde_json::json!({ "generation": generation }))
            .send()
            .await
            .map_err(fail)?;
        if res.status().is_client_error() {
            let status = res.status().as_u16();
            let body = res.text().await.unwrap_or_default();
            return Err(AdminError::Refused {
                url: url.clone(),
                status,
                body,
            });
        }
        res.error_for_status().map_err(fail)?;
        Ok(())
    }
}

/// The serving projection's `lagMessages` in a `/sync-status` body (`None` when it is not reported).
pub fn serving_lag_of(sync_status: &serde_json::Value) -> Option<i64> {
    sync_status["projections"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "serving")?
        .get("lagMessages")?
        .as_i64()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::serving_lag_of;

    #[test]
    fn serving_lag_is_read_from_sync_status() {
        let v = json!({"caughtUp": false, "projections": [
            {"name": "rebuild", "generation": 3, "lagMessages": 900},
            {"name": "serving", "generation": 2, "lagMessages": 17}]});
        assert_eq!(serving_lag_of(&v), Some(17));
        let err =
            json!({"projections": [{"name": "serving", "generation": 2, "error": "kafka down"}]});
        assert_eq!(serving_lag_of(&err), None);
        assert_eq!(serving_lag_of(&json!({})), None);
    }
}
