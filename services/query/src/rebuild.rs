//! Projection generations and blue/green rebuilds.
//!
//! The `_meta` collection holds one document, `{_id: "projection"}`:
//! `{serving: G, servingGroup, rebuild: null | {generation, group, state, startedAt, finishedAt,
//! previousGeneration}, pendingDrops: [{generation, dropAfter}], dropping: [{generation, claimedAt}]}`. It is
//! the single source of truth shared by every replica; each replica's supervisor re-reads it every `meta_poll_ms` and reconciles its local projectors
//! (one for the serving generation, one for a running rebuild). The switch is one single-document update
//! (atomic in MongoDB), guarded by `rebuild.state == "running"`, so exactly one replica performs it.

use std::{sync::Arc, time::Duration};

use mongodb::bson::{Bson, Document, doc};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{ctx::Ctx, error::QueryError, projector::Projector, status};

const META_ID: &str = "projection";
/// Collections of a cancelled rebuild are dropped this long after the cancel, once every replica has stopped
/// writing to them.
const CANCEL_DROP_DELAY: Duration = Duration::from_secs(10);
/// A drop claimed longer ago than this is taken to have died with its replica: the claim is released (and the
/// drop rescheduled, or taken over by a rebuild of that generation, which drops the collections itself).
const DROP_LEASE: Duration = Duration::from_secs(120);
/// How long starting a rebuild waits for a drop of the same generation that another replica is performing.
const DROP_WAIT: Duration = Duration::from_secs(30);
/// How often the supervisor refreshes the consumer-lag and DLQ gauges.
const GAUGE_PERIOD: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
pub struct RebuildMeta {
    pub generation: u32,
    pub group: String,
    pub state: String,
    pub previous_generation: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub serving: u32,
    pub serving_group: String,
    pub rebuild: Option<RebuildMeta>,
    pub pending_drops: Vec<(u32, i64)>,
    /// Drops in progress: (generation, claimedAt ms). A rebuild of such a generation cannot start until the
    /// drop has finished (or its claim went stale, see [`DROP_LEASE`]).
    pub dropping: Vec<(u32, i64)>,
}

fn as_u32(b: Option<&Bson>) -> Option<u32> {
    match b {
        Some(Bson::Int32(i)) => u32::try_from(*i).ok(),
        Some(Bson::Int64(i)) => u32::try_from(*i).ok(),
        _ => None,
    }
}

fn as_i64(b: Option<&Bson>) -> Option<i64> {
    match b {
        Some(Bson::Int32(i)) => Some(i64::from(*i)),
        Some(Bson::Int64(i)) => Some(*i),
        _ => None,
    }
}

impl Meta {
    fn parse(d: &Document) -> Result<Self, QueryError> {
        let serving = as_u32(d.get("serving"))
            .ok_or_else(|| QueryError::Other("_meta without serving".into()))?;
        let serving_group = d.get_str("servingGroup").unwrap_or_default().to_owned();
        let rebuild = d.get_document("rebuild").ok().and_then(|r| {
            Some(RebuildMeta {
                generation: as_u32(r.get("generation"))?,
                group: r.get_str("group").ok()?.to_owned(),
                state: r.get_str("state").ok()?.to_owned(),
                previous_generation: as_u32(r.get("previousGeneration")),
            })
        });
        let pending_drops = d
            .get_array("pendingDrops")
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_document())
                    .filter_map(|e| {
                        Some((as_u32(e.get("generation"))?, as_i64(e.get("dropAfter"))?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let dropping = d
            .get_array("dropping")
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_document())
                    .filter_map(|e| {
                        Some((as_u32(e.get("generation"))?, as_i64(e.get("claimedAt"))?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            serving,
            serving_group,
            rebuild,
            pending_drops,
            dropping,
        })
    }

    /// The rebuild that should have a running projector.
    pub fn running_rebuild(&self) -> Option<&RebuildMeta> {
        self.rebuild.as_ref().filter(|r| r.state == "running")
    }
}

#[derive(Default)]
struct Local {
    serving: Option<Projector>,
    rebuild: Option<Projector>,
    started: bool,
    /// Last computed (progress, lag) of the running rebuild.
    progress: Option<(f64, i64)>,
    /// When the serving lag and DLQ gauges were last refreshed.
    gauges_at: Option<std::time::Instant>,
}

/// The problem a rebuild request can have.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("generation {requested} is older than the serving generation {serving}")]
    Older { requested: u32, serving: u32 },
    #[error("generation must be at least 1")]
    Invalid,
    #[error(transparent)]
    Query(#[from] QueryError),
}

pub struct Supervisor {
    ctx: Arc<Ctx>,
    local: Mutex<Local>,
}

impl Supervisor {
    /// Reads (or creates) `_meta` and makes `ctx` serve its generation.
    pub async fn init(ctx: Arc<Ctx>) -> Result<Arc<Self>, QueryError> {
        let g = ctx.config.projection_generation.max(1);
        ctx.store
            .meta()
            .update_one(
                doc! {"_id": META_ID},
                doc! {"$setOnInsert": {
                    "serving": i64::from(g), "servingGroup": ctx.base_group(g), "rebuild": Bson::Null,
                    "pendingDrops": [],
                }},
            )
            .upsert(true)
            .await?;
        let meta = Self::read_meta(&ctx).await?;
        ctx.set_serving(meta.serving);
        Ok(Arc::new(Self {
            ctx,
            local: Mutex::new(Local::default()),
        }))
    }

    pub async fn read_meta(ctx: &Ctx) -> Result<Meta, QueryError> {
        let d = ctx
            .store
            .meta()
            .find_one(doc! {"_id": META_ID})
            .await?
            .ok_or_else(|| QueryError::Other("_meta document missing".into()))?;
        Meta::parse(&d)
    }

    /// Starts the projectors and, if `PROJECTION_GENERATION` is above the serving generation, a rebuild to it.
    pub async fn start(self: &Arc<Self>) -> Result<(), QueryError> {
        self.local.lock().await.started = true;
        let meta = Self::read_meta(&self.ctx).await?;
        let wanted = self.ctx.config.projection_generation;
        let cancelled = meta.rebuild.as_ref().is_some_and(|r| {
            r.generation == wanted && (r.state == "cancelled" || r.state == "failed")
        });
        if wanted > meta.serving && cancelled {
            // Cancelled through the admin API: a restart (with the same configuration) does not undo that. A
            // POST of the generation, or another generation, starts a rebuild again (docs/OPERATOR.md).
            tracing::warn!(
                wanted,
                serving = meta.serving,
                "the rebuild to PROJECTION_GENERATION was cancelled; not restarting it"
            );
        } else if wanted > meta.serving
            && meta
                .rebuild
                .as_ref()
                .is_none_or(|r| r.generation != wanted || r.state != "running")
        {
            tracing::info!(
                wanted,
                serving = meta.serving,
                "PROJECTION_GENERATION is newer: starting a rebuild"
            );
            if let Err(e) = self.start_rebuild(wanted).await {
                tracing::error!(error = %e, "could not start the rebuild to PROJECTION_GENERATION");
            }
        }
        self.tick().await
    }

    pub async fn shutdown(&self) {
        let mut local = self.local.lock().await;
        local.started = false;
        let (a, b) = (local.serving.take(), local.rebuild.take());
        if let Some(p) = a {
            p.stop().await;
        }
        if let Some(p) = b {
            p.stop().await;
        }
    }

    /// The serving generation and its consumer group, and the running rebuild's.
    pub async fn groups(&self) -> Result<((u32, String), Option<(u32, String)>), QueryError> {
        let meta = Self::read_meta(&self.ctx).await?;
        let rebuild = meta
            .running_rebuild()
            .map(|r| (r.generation, r.group.clone()));
        Ok(((meta.serving, meta.serving_group), rebuild))
    }

    /// One reconciliation step: adopt switches made elsewhere, keep the right projectors running, switch a
    /// caught-up rebuild, drop collections whose grace period is over.
    pub async fn tick(&self) -> Result<(), QueryError> {
        let mut local = self.local.lock().await;
        if !local.started {
            return Ok(());
        }
        let meta = Self::read_meta(&self.ctx).await?;
        self.reconcile(&mut local, &meta).await;
        if let Some(r) = meta.running_rebuild() {
            let lag = status::projection_lag(&self.ctx, "rebuild", r.generation, &r.group).await?;
            let total: i64 = lag.partitions.iter().map(|p| p.high - p.low).sum();
            let progress = if total == 0 {
                1.0
            } else {
                1.0 - lag.lag_messages as f64 / total as f64
            };
            local.progress = Some((progress, lag.lag_messages));
            self.ctx
                .metrics
                .rebuild_generation
                .set(i64::from(r.generation));
            self.ctx.metrics.rebuild_progress.set(progress);
            self.ctx.metrics.rebuild_lag.set(lag.lag_messages);
            if lag.lag_messages == 0 {
                self.switch(&mut local, &meta, r).await?;
            }
        }
        if local.gauges_at.is_none_or(|t| t.elapsed() >= GAUGE_PERIOD) {
            local.gauges_at = Some(std::time::Instant::now());
            // Keeps cqrs_query_consumer_lag and cqrs_query_dlq_messages fresh without a /sync-status caller.
            if let Err(e) =
                status::projection_lag(&self.ctx, "serving", meta.serving, &meta.serving_group)
                    .await
            {
                tracing::debug!(error = %e, "lag gauge refresh failed");
            }
            let _ = status::dlq_count(&self.ctx).await;
        }
        self.apply_drops(&meta, chrono::Utc::now().timestamp_millis())
            .await?;
        Ok(())
    }

    /// Drops the collections of the generations in `meta.pendingDrops` whose time has come (`now`, ms).
    ///
    /// `meta` may be stale (it was read before slow Kafka calls, or on a replica that is behind), so it only
    /// nominates candidates: each drop is first claimed with one conditional update of the *current* `_meta`
    /// document — the entry must still be pending and due, the generation must not be serving and must not be
    /// the running rebuild — which moves it from `pendingDrops` to `dropping`. Only the claimer drops, and
    /// removes the claim afterwards. A rebuild of that generation starts only when no claim for it exists
    /// ([`Self::start_rebuild`]), so a drop never runs while a rebuild of the same generation is live.
    pub async fn apply_drops(&self, meta: &Meta, now: i64) -> Result<(), QueryError> {
        for (g, after) in &meta.pending_drops {
            if *after > now || *g == meta.serving {
                continue;
            }
            let g64 = i64::from(*g);
            let claimed = self
                .ctx
                .store
                .meta()
                .update_one(
                    doc! {
                        "_id": META_ID,
                        "serving": {"$ne": g64},
                        "pendingDrops": {"$elemMatch": {"generation": g64, "dropAfter": {"$lte": now}}},
                        "dropping.generation": {"$ne": g64},
                        "$or": [{"rebuild.generation": {"$ne": g64}}, {"rebuild.state": {"$ne": "running"}}],
                    },
                    doc! {
                        "$pull": {"pendingDrops": {"generation": g64}},
                        "$push": {"dropping": {"generation": g64, "claimedAt": now}},
                    },
                )
                .await?;
            if claimed.modified_count != 1 {
                tracing::info!(
                    generation = g,
                    "not dropping: the generation was restarted, is serving, or another replica drops it"
                );
                continue;
            }
            tracing::info!(
                generation = g,
                "dropping the collections of a retired generation"
            );
            self.ctx.store.drop_generation(*g).await?;
            self.ctx
                .store
                .meta()
                .update_one(
                    doc! {"_id": META_ID},
                    doc! {"$pull": {"dropping": {"generation": g64}}},
                )
                .await?;
        }
        // A claim whose replica died mid-drop: release it and schedule the drop again (now).
        let lease = i64::try_from(DROP_LEASE.as_millis()).unwrap_or(i64::MAX);
        for (g, claimed_at) in &meta.dropping {
            if now.saturating_sub(*claimed_at) < lease {
                continue;
            }
            let g64 = i64::from(*g);
            self.ctx
                .store
                .meta()
                .update_one(
                    doc! {"_id": META_ID, "dropping": {"$elemMatch": {"generation": g64, "claimedAt": *claimed_at}}},
                    doc! {
                        "$pull": {"dropping": {"generation": g64}},
                        "$push": {"pendingDrops": {"generation": g64, "dropAfter": now}},
                    },
                )
                .await?;
        }
        Ok(())
    }

    /// Waits until no replica is dropping `generation`'s collections (claims older than [`DROP_LEASE`] are
    /// released here: their collections are dropped again by the caller anyway).
    async fn wait_for_drop(&self, generation: u32) -> Result<(), QueryError> {
        let deadline = tokio::time::Instant::now() + DROP_WAIT;
        let g64 = i64::from(generation);
        loop {
            let meta = Self::read_meta(&self.ctx).await?;
            let Some((_, claimed_at)) = meta.dropping.iter().find(|(g, _)| *g == generation) else {
                return Ok(());
            };
            let now = chrono::Utc::now().timestamp_millis();
            if now.saturating_sub(*claimed_at)
                >= i64::try_from(DROP_LEASE.as_millis()).unwrap_or(i64::MAX)
            {
                self.ctx
                    .store
                    .meta()
                    .update_one(
                        doc! {"_id": META_ID, "dropping": {"$elemMatch": {"generation": g64, "claimedAt": *claimed_at}}},
                        doc! {"$pull": {"dropping": {"generation": g64}}},
                    )
                    .await?;
                continue;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QueryError::Busy(format!(
                    "generation {generation} is still being dropped by another replica; retry later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn reconcile(&self, local: &mut Local, meta: &Meta) {
        if self.ctx.serving() != meta.serving {
            tracing::info!(
                from = self.ctx.serving(),
                to = meta.serving,
                "serving generation changed"
            );
            self.ctx.set_serving(meta.serving);
        }
        if !self.ctx.config.consume {
            // A read-only replica follows `_meta` but runs no apply loop.
            return;
        }
        let serving_ok = local
            .serving
            .as_ref()
            .is_some_and(|p| p.generation == meta.serving);
        if !serving_ok {
            let old = local.serving.take();
            // A rebuild projector of the new serving generation becomes the serving one.
            if local
                .rebuild
                .as_ref()
                .is_some_and(|p| p.generation == meta.serving)
            {
                local.serving = local.rebuild.take();
            } else {
                local.serving = Some(Projector::spawn(
                    self.ctx.clone(),
                    meta.serving,
                    meta.serving_group.clone(),
                ));
            }
            if let Some(p) = old {
                p.stop().await;
            }
        }
        match meta.running_rebuild() {
            Some(r) => {
                if !local
                    .rebuild
                    .as_ref()
                    .is_some_and(|p| p.generation == r.generation && p.group == r.group)
                {
                    if let Some(p) = local.rebuild.take() {
                        p.stop().await;
                    }
                    local.rebuild = Some(Projector::spawn(
                        self.ctx.clone(),
                        r.generation,
                        r.group.clone(),
                    ));
                }
            }
            None => {
                if let Some(p) = local.rebuild.take() {
                    p.stop().await;
                }
                self.ctx.metrics.rebuild_generation.set(0);
            }
        }
    }

    async fn switch(
        &self,
        local: &mut Local,
        meta: &Meta,
        r: &RebuildMeta,
    ) -> Result<(), QueryError> {
        let now = chrono::Utc::now();
        let drop_after = now.timestamp_millis()
            + i64::try_from(self.ctx.config.rebuild_grace_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX / 2);
        let res = self
            .ctx
            .store
            .meta()
            .update_one(
                doc! {"_id": META_ID, "rebuild.generation": i64::from(r.generation), "rebuild.group": &r.group,
                      "rebuild.state": "running", "serving": i64::from(meta.serving)},
                doc! {
                    "$set": {
                        "serving": i64::from(r.generation), "servingGroup": &r.group,
                        "rebuild.state": "switched", "rebuild.previousGeneration": i64::from(meta.serving),
                        "rebuild.finishedAt": now.to_rfc3339(),
                    },
                    "$push": {"pendingDrops": {"generation": i64::from(meta.serving), "dropAfter": drop_after}},
                },
            )
            .await?;
        if res.modified_count == 1 {
            tracing::info!(
                from = meta.serving,
                to = r.generation,
                "rebuild caught up: reads switched"
            );
        }
        let meta = Self::read_meta(&self.ctx).await?;
        self.reconcile(local, &meta).await;
        self.ctx.metrics.rebuild_progress.set(1.0);
        self.ctx.metrics.rebuild_lag.set(0);
        Ok(())
    }

    /// `POST /admin/projections/rebuild {"generation": N}`.
    pub async fn start_rebuild(&self, generation: u32) -> Result<Value, RebuildError> {
        if generation == 0 {
            return Err(RebuildError::Invalid);
        }
        {
            let mut local = self.local.lock().await;
            let meta = Self::read_meta(&self.ctx).await?;
            if generation < meta.serving {
                return Err(RebuildError::Older {
                    requested: generation,
                    serving: meta.serving,
                });
            }
            let same_running = meta
                .running_rebuild()
                .is_some_and(|r| r.generation == generation);
            if generation != meta.serving && !same_running {
                if let Some(r) = meta.running_rebuild() {
                    tracing::info!(
                        old = r.generation,
                        new = generation,
                        "replacing the running rebuild"
                    );
                    if let Some(p) = local.rebuild.take() {
                        p.stop().await;
                    }
                    self.schedule_drop(r.generation).await?;
                }
                let group = format!(
                    "{}.query.g{generation}.{}",
                    self.ctx.topics.prefix(),
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                );
                let g64 = i64::from(generation);
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    // Start clean: a previous attempt at this generation may have left documents behind.
                    self.wait_for_drop(generation).await?;
                    self.ctx.store.drop_generation(generation).await?;
                    // Cancelling the generation's pending drop and starting the rebuild is one update, and it
                    // happens only if no replica claimed a drop of this generation meanwhile (see
                    // `apply_drops`): once it is done, nothing drops these collections while the rebuild runs.
                    let started = self
                        .ctx
                        .store
                        .meta()
                        .update_one(
                            doc! {"_id": META_ID, "dropping.generation": {"$ne": g64}},
                            doc! {
                                "$pull": {"pendingDrops": {"generation": g64}},
                                "$set": {"rebuild": {
                                    "generation": g64, "group": &group, "state": "running",
                                    "startedAt": chrono::Utc::now().to_rfc3339(),
                                }},
                            },
                        )
                        .await
                        .map_err(QueryError::from)?;
                    if started.matched_count == 1 {
                        break;
                    }
                    if attempts >= 10 {
                        return Err(QueryError::Busy(format!(
                            "generation {generation} keeps being dropped by another replica; retry later"
                        ))
                        .into());
                    }
                }
                local.progress = Some((0.0, -1));
                tracing::info!(generation, %group, "rebuild started");
            }
        }
        self.tick().await?;
        Ok(self.status().await?)
    }

    async fn schedule_drop(&self, generation: u32) -> Result<(), QueryError> {
        let after = chrono::Utc::now().timestamp_millis()
            + i64::try_from(CANCEL_DROP_DELAY.as_millis()).unwrap_or(10_000)
            + i64::try_from(self.ctx.config.meta_poll_ms).unwrap_or(0) * 2;
        self.ctx
            .store
            .meta()
            .update_one(
                doc! {"_id": META_ID},
                doc! {"$push": {"pendingDrops": {"generation": i64::from(generation), "dropAfter": after}}},
            )
            .await?;
        Ok(())
    }

    /// `DELETE /admin/projections/rebuild`: stops a running rebuild; its collections are dropped shortly after.
    pub async fn cancel_rebuild(&self) -> Result<Value, QueryError> {
        {
            let mut local = self.local.lock().await;
            let meta = Self::read_meta(&self.ctx).await?;
            if let Some(r) = meta.running_rebuild() {
                self.ctx
                    .store
                    .meta()
                    .update_one(
                        doc! {"_id": META_ID, "rebuild.group": &r.group, "rebuild.state": "running"},
                        doc! {"$set": {"rebuild.state": "cancelled",
                                       "rebuild.finishedAt": chrono::Utc::now().to_rfc3339()}},
                    )
                    .await?;
                if let Some(p) = local.rebuild.take() {
                    p.stop().await;
                }
                self.schedule_drop(r.generation).await?;
                tracing::info!(generation = r.generation, "rebuild cancelled");
            }
        }
        self.status().await
    }

    /// `GET /admin/projections`:
    /// `{"serving":G,"rebuild":{"generation":N,"state":"running|caughtUp|switched|cancelled|failed",
    /// "progress":0.0-1.0,"lag":n}|null}`.
    pub async fn status(&self) -> Result<Value, QueryError> {
        let meta = Self::read_meta(&self.ctx).await?;
        let rebuild = match &meta.rebuild {
            None => Value::Null,
            Some(r) => {
                let (progress, lag) = match r.state.as_str() {
                    "running" => {
                        let l =
                            status::projection_lag(&self.ctx, "rebuild", r.generation, &r.group)
                                .await?;
                        let total: i64 = l.partitions.iter().map(|p| p.high - p.low).sum();
                        let p = if total == 0 {
                            1.0
                        } else {
                            1.0 - l.lag_messages as f64 / total as f64
                        };
                        (p, Some(l.lag_messages))
                    }
                    "switched" => (1.0, Some(0)),
                    _ => {
                        let local = self.local.lock().await;
                        (local.progress.map(|p| p.0).unwrap_or(0.0), None)
                    }
                };
                // Lag 0 but not yet switched: the supervisor switches on its next tick.
                let state = if r.state == "running" && lag == Some(0) {
                    "caughtUp"
                } else {
                    r.state.as_str()
                };
                json!({"generation": r.generation, "state": state, "progress": progress, "lag": lag})
            }
        };
        Ok(json!({"serving": meta.serving, "rebuild": rebuild}))
    }

    /// True when a rebuild projector task of this process ended on its own (only the fault hook does that).
    pub async fn serving_projector_finished(&self) -> bool {
        self.local
            .lock()
            .await
            .serving
            .as_ref()
            .is_some_and(Projector::is_finished)
    }
}

/// Runs [`Supervisor::tick`] every `meta_poll_ms` until cancelled.
pub async fn supervise(
    sup: Arc<Supervisor>,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sup.tick().await {
            tracing::warn!(error = %e, "projection supervisor tick failed");
        }
    }
}
