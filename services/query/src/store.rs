//! MongoDB access: batched version-guarded writes through the classic `insert`/`update` commands (which real
//! MongoDB 7/8 and the SecantusDB stand-in both support), reads, and the `_meta` document.

use std::collections::{HashMap, HashSet};

use cqrs_events::AggregateType;
use futures::TryStreamExt;
use mongodb::{
    Client, Database,
    bson::{Bson, Document, doc},
    options::FindOptions,
};

use crate::{error::QueryError, model::collection_name};

/// Ids per `$in` query when loading a batch's current documents.
const FETCH_CHUNK: usize = 100;

/// Duplicate key: another writer created the document first.
const DUPLICATE_KEY: i32 = 11000;

#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub db: Database,
}

/// What happened to a batch write.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// Inserts that hit an existing document: someone else created it meanwhile; the caller re-plans them.
    pub conflicted_inserts: HashSet<String>,
    /// Guarded updates whose guard said "already at this version or newer" (duplicate key on upsert).
    pub already_applied: usize,
}

impl Store {
    pub async fn connect(url: &str, db: &str) -> Result<Self, QueryError> {
        let mut opts = mongodb::options::ClientOptions::parse(url).await?;
        opts.server_selection_timeout = Some(std::time::Duration::from_secs(3));
        opts.app_name = Some("cqrs-query".into());
        let client = Client::with_options(opts)?;
        let db = client.database(db);
        Ok(Self { client, db })
    }

    pub async fn ping(&self) -> Result<(), QueryError> {
        self.db.run_command(doc! {"ping": 1}).await?;
        Ok(())
    }

    fn coll(&self, entity: AggregateType, generation: u32) -> mongodb::Collection<Document> {
        self.db.collection(&collection_name(entity, generation))
    }

    /// The current documents of `ids` (tombstones included), one round trip.
    pub async fn fetch(
        &self,
        entity: AggregateType,
        generation: u32,
        ids: &[String],
    ) -> Result<HashMap<String, Document>, QueryError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        // `$in` lists are kept short: SecantusDB's `$in` gets superlinear (1,000 ids: ~900 docs/s, 100 ids:
        // ~7,000 docs/s on 2 cores), and short lists cost real MongoDB nothing.
        let coll = self.coll(entity, generation);
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(FETCH_CHUNK) {
            let cursor = coll.find(doc! {"_id": {"$in": chunk}}).await?;
            let docs: Vec<Document> = cursor.try_collect().await?;
            for d in docs {
                if let Ok(id) = d.get_str("_id").map(str::to_owned) {
                    out.insert(id, d);
                }
            }
        }
        Ok(out)
    }

    /// Writes new documents with one `insert` command and changed ones with one `update` command, each
    /// unordered. Every update is guarded: `{_id, version: {$lt: newVersion}}` with upsert, so a document that
    /// is already at this version or newer is left alone (the upsert then collides on `_id`: duplicate key,
    /// counted as already applied). The write concern is majority: the offsets are committed only after this
    /// returns.
    pub async fn write_batch(
        &self,
        entity: AggregateType,
        generation: u32,
        inserts: Vec<Document>,
        updates: Vec<Document>,
    ) -> Result<WriteOutcome, QueryError> {
        let name = collection_name(entity, generation);
        let mut out = WriteOutcome::default();
        if !inserts.is_empty() {
            let ids: Vec<String> = inserts
                .iter()
                .map(|d| d.get_str("_id").map(str::to_owned).unwrap_or_default())
                .collect();
            let reply = self
                .db
                .run_command(doc! {
                    "insert": &name, "documents": inserts, "ordered": false,
                    "writeConcern": {"w": "majority"},
                })
                .await?;
            for (index, code, msg) in write_errors(&reply) {
                if code == DUPLICATE_KEY {
                    if let Some(id) = ids.get(index) {
                        out.conflicted_inserts.insert(id.clone());
                    }
                } else {
                    return Err(QueryError::Other(format!(
                        "insert into {name} failed: {code} {msg}"
                    )));
                }
            }
        }
        if !updates.is_empty() {
            let statements: Vec<Bson> = updates
                .into_iter()
                .map(|d| {
                    let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                    let version = d.get("version").cloned().unwrap_or(Bson::Int64(0));
                    Bson::Document(doc! {
                        "q": {"_id": id, "version": {"$lt": version}},
                        "u": d,
                        "upsert": true,
                    })
                })
                .collect();
            let reply = self
                .db
                .run_command(doc! {
                    "update": &name, "updates": statements, "ordered": false,
                    "writeConcern": {"w": "majority"},
                })
                .await?;
            for (_, code, msg) in write_errors(&reply) {
                if code == DUPLICATE_KEY {
                    out.already_applied += 1;
                } else {
                    return Err(QueryError::Other(format!(
                        "update of {name} failed: {code} {msg}"
                    )));
                }
            }
        }
        Ok(out)
    }

    pub async fn get(
        &self,
        entity: AggregateType,
        generation: u32,
        id: &str,
    ) -> Result<Option<Document>, QueryError> {
        Ok(self
            .coll(entity, generation)
            .find_one(doc! {"_id": id})
            .await?)
    }

    /// One page of live (not deleted) documents in `_id` order, after `after`.
    pub async fn list(
        &self,
        entity: AggregateType,
        generation: u32,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Document>, QueryError> {
        let mut filter = doc! {"deleted": {"$ne": true}};
        if let Some(a) = after {
            filter.insert("_id", doc! {"$gt": a});
        }
        let opts = FindOptions::builder()
            .sort(doc! {"_id": 1})
            .limit(i64::from(limit))
            .build();
        let cursor = self
            .coll(entity, generation)
            .find(filter)
            .with_options(opts)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    pub async fn count(&self, entity: AggregateType, generation: u32) -> Result<u64, QueryError> {
        Ok(self
            .coll(entity, generation)
            .count_documents(doc! {})
            .await?)
    }

    pub async fn drop_generation(&self, generation: u32) -> Result<(), QueryError> {
        for e in AggregateType::ALL {
            self.coll(e, generation).drop().await?;
        }
        Ok(())
    }

    pub fn meta(&self) -> mongodb::Collection<Document> {
        self.db.collection("_meta")
    }
}

/// `(index, code, errmsg)` of each entry of a write command's `writeErrors`.
fn write_errors(reply: &Document) -> Vec<(usize, i32, String)> {
    let Ok(errs) = reply.get_array("writeErrors") else {
        return Vec::new();
    };
    errs.iter()
        .filter_map(|e| e.as_document())
        .map(|e| {
            let index = match e.get("index") {
                Some(Bson::Int32(i)) => usize::try_from(*i).unwrap_or(usize::MAX),
                Some(Bson::Int64(i)) => usize::try_from(*i).unwrap_or(usize::MAX),
                _ => usize::MAX,
            };
            let code = match e.get("code") {
                Some(Bson::Int32(c)) => *c,
                Some(Bson::Int64(c)) => i32::try_from(*c).unwrap_or(-1),
                _ => -1,
            };
            (
                index,
                code,
                e.get_str("errmsg").unwrap_or_default().to_owned(),
            )
        })
        .collect()
}
