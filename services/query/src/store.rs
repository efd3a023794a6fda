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
    /// `w` of the read-model writes (`"majority"` unless configured otherwise).
    write_concern: Bson,
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
    /// `write_concern` is the `w` of the read-model writes: `majority`, a number of nodes, or a tag name.
    pub async fn connect(url: &str, db: &str, write_concern: &str) -> Result<Self, QueryError> {
        let mut opts = mongodb::options::ClientOptions::parse(url).await?;
        opts.server_selection_timeout = Some(std::time::Duration::from_secs(3));
        opts.app_name = Some("cqrs-query".into());
        let client = Client::with_options(opts)?;
        let db = client.database(db);
        let write_concern = parse_write_concern(write_concern)?;
        Ok(Self {
            client,
            db,
            write_concern,
        })
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
                    "writeConcern": {"w": self.write_concern.clone()},
                })
                .await?;
            for WriteError { index, code, msg } in write_reply(&reply, "insert", &name)? {
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
                    "writeConcern": {"w": self.write_concern.clone()},
                })
                .await?;
            for WriteError { code, msg, .. } in write_reply(&reply, "update", &name)? {
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

/// `QUERY_WRITE_CONCERN` as the `w` value: a number of nodes, or a name (`majority` or a replica-set tag).
pub fn parse_write_concern(w: &str) -> Result<Bson, QueryError> {
    match w.trim() {
        "" => Err(QueryError::Config(
            "write concern must be majority, a tag or a node count".into(),
        )),
        w => match w.parse::<i64>() {
            Ok(n) => i32::try_from(n)
                .ok()
                .filter(|n| *n >= 0)
                .map(Bson::Int32)
                .ok_or_else(|| {
                    QueryError::Config(format!("write concern node count out of range: {n}"))
                }),
            Err(_) => Ok(Bson::String(w.to_owned())),
        },
    }
}

/// One entry of a write command's `writeErrors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteError {
    pub index: usize,
    pub code: i32,
    pub msg: String,
}

fn as_i32(b: Option<&Bson>) -> i32 {
    match b {
        Some(Bson::Int32(c)) => *c,
        Some(Bson::Int64(c)) => i32::try_from(*c).unwrap_or(-1),
        Some(Bson::Double(c)) if c.fract() == 0.0 && c.abs() <= f64::from(i32::MAX) => *c as i32,
        _ => -1,
    }
}

/// Interprets the reply of an `insert`/`update` command (pure, so it is unit-tested with the replies MongoDB
/// sends).
///
/// - `ok` other than 1: the command failed as a whole → error (the driver normally reports this itself).
/// - A `writeConcernError` (e.g. the primary stepped down before the write reached a majority, or `w` cannot be
///   satisfied) → error, even though `ok` is 1 and `n` counts the documents: the write is not known to be
///   majority-committed and may be rolled back, so the caller must not commit the batch's offsets. It retries
///   the batch instead; the version guards make the retry idempotent.
/// - Otherwise the per-statement `writeErrors`, for the caller to classify (duplicate keys are expected).
pub fn write_reply(
    reply: &Document,
    command: &str,
    collection: &str,
) -> Result<Vec<WriteError>, QueryError> {
    let ok = match reply.get("ok") {
        Some(Bson::Double(v)) => *v == 1.0,
        Some(Bson::Int32(v)) => *v == 1,
        Some(Bson::Int64(v)) => *v == 1,
        Some(Bson::Boolean(v)) => *v,
        _ => false,
    };
    if !ok {
        return Err(QueryError::Other(format!(
            "{command} on {collection} failed: {} {}",
            as_i32(reply.get("code")),
            reply.get_str("errmsg").unwrap_or_default()
        )));
    }
    if let Some(wce) = reply.get("writeConcernError") {
        let wce = wce.as_document();
        return Err(QueryError::WriteConcern {
            command: command.to_owned(),
            collection: collection.to_owned(),
            code: wce.map(|d| as_i32(d.get("code"))).unwrap_or(-1),
            code_name: wce
                .and_then(|d| d.get_str("codeName").ok())
                .unwrap_or_default()
                .to_owned(),
            message: wce
                .and_then(|d| d.get_str("errmsg").ok())
                .unwrap_or_default()
                .to_owned(),
        });
    }
    let Ok(errs) = reply.get_array("writeErrors") else {
        return Ok(Vec::new());
    };
    Ok(errs
        .iter()
        .filter_map(|e| e.as_document())
        .map(|e| WriteError {
            index: match e.get("index") {
                Some(Bson::Int32(i)) => usize::try_from(*i).unwrap_or(usize::MAX),
                Some(Bson::Int64(i)) => usize::try_from(*i).unwrap_or(usize::MAX),
                _ => usize::MAX,
            },
            code: as_i32(e.get("code")),
            msg: e.get_str("errmsg").unwrap_or_default().to_owned(),
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use mongodb::bson::{Timestamp, doc, oid::ObjectId};

    use super::*;

    fn cluster_time() -> Document {
        doc! {"clusterTime": Timestamp { time: 1_796_153_168, increment: 5 },
        "signature": {"hash": Bson::Binary(mongodb::bson::Binary {
            subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: vec![0; 20] }),
            "keyId": 0_i64}}
    }

    #[test]
    fn a_plain_acknowledged_write_has_no_errors() {
        // `insert` reply of a replica-set primary.
        let reply = doc! {"n": 2, "electionId": ObjectId::new(), "opTime": {"ts": Timestamp { time: 1, increment: 1 }, "t": 3_i64},
        "ok": 1.0, "$clusterTime": cluster_time(),
        "operationTime": Timestamp { time: 1, increment: 1 }};
        assert_eq!(write_reply(&reply, "insert", "users_g1").unwrap(), vec![]);
        // `update` reply with upserts.
        let reply =
            doc! {"n": 1, "upserted": [{"index": 0, "_id": "a"}], "nModified": 0, "ok": 1.0};
        assert_eq!(write_reply(&reply, "update", "users_g1").unwrap(), vec![]);
    }

    #[test]
    fn duplicate_keys_are_reported_per_statement() {
        let reply = doc! {"n": 1, "writeErrors": [{
            "index": 1, "code": 11000,
            "keyPattern": {"_id": 1}, "keyValue": {"_id": "7f0c"},
            "errmsg": "E11000 duplicate key error collection: cqrs.users_g1 index: _id_ dup key: { _id: \"7f0c\" }",
        }], "ok": 1.0};
        let errs = write_reply(&reply, "insert", "users_g1").unwrap();
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].index, errs[0].code), (1, DUPLICATE_KEY));
        assert!(errs[0].msg.starts_with("E11000"));
    }

    #[test]
    fn a_write_concern_error_with_ok_1_is_a_failure() {
        // What a primary answers when it steps down while waiting for majority replication: `ok: 1`, `n` counts
        // the documents it wrote locally (which may be rolled back).
        let stepped_down = doc! {
            "n": 3, "electionId": ObjectId::new(), "opTime": {"ts": Timestamp { time: 9, increment: 2 }, "t": 7_i64},
            "writeConcernError": {"code": 189, "codeName": "PrimarySteppedDown",
                                  "errmsg": "Primary stepped down while waiting for replication",
                                  "errInfo": {"writeConcern": {"w": "majority", "wtimeout": 0, "provenance": "clientSupplied"}}},
            "ok": 1.0, "$clusterTime": cluster_time(), "operationTime": Timestamp { time: 9, increment: 2 },
        };
        // A timeout waiting for replication (`wtimeout`), and a shutdown during the wait.
        let timed_out = doc! {"n": 1, "nModified": 1, "writeConcernError": {"code": 64, "codeName": "WriteConcernFailed",
        "errmsg": "waiting for replication timed out", "errInfo": {"wtimeout": true,
        "writeConcern": {"w": "majority", "wtimeout": 5000, "provenance": "clientSupplied"}}}, "ok": 1.0};
        let shutdown = doc! {"n": 1, "writeConcernError": {"code": 91, "codeName": "ShutdownInProgress",
        "errmsg": "Replication is being shut down"}, "ok": 1.0};
        // The shape SecantusDB answers to `w: 5` on its one node (integer `ok` as some servers send).
        let unsatisfiable = doc! {"n": 1, "writeConcernError": {"code": 100, "codeName": "UnsatisfiableWriteConcern",
        "errmsg": "Not enough data-bearing nodes"}, "ok": 1_i32};
        for (reply, code, name) in [
            (stepped_down, 189, "PrimarySteppedDown"),
            (timed_out, 64, "WriteConcernFailed"),
            (shutdown, 91, "ShutdownInProgress"),
            (unsatisfiable, 100, "UnsatisfiableWriteConcern"),
        ] {
            match write_reply(&reply, "update", "orders_g2") {
                Err(QueryError::WriteConcern {
                    code: c,
                    code_name,
                    command,
                    collection,
                    ..
                }) => {
                    assert_eq!((c, code_name.as_str()), (code, name));
                    assert_eq!(
                        (command.as_str(), collection.as_str()),
                        ("update", "orders_g2")
                    );
                }
                other => panic!("{name}: expected a write-concern failure, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_write_concern_error_wins_over_write_errors() {
        // Duplicate keys alone would be "already applied"; with the write concern failed nothing is known durable.
        let reply = doc! {"n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key error"}],
        "writeConcernError": {"code": 189, "codeName": "PrimarySteppedDown", "errmsg": "Primary stepped down"},
        "ok": 1.0};
        assert!(matches!(
            write_reply(&reply, "update", "users_g1"),
            Err(QueryError::WriteConcern { code: 189, .. })
        ));
    }

    #[test]
    fn ok_0_is_a_failure() {
        let reply = doc! {"ok": 0.0, "errmsg": "not primary", "code": 10107, "codeName": "NotWritablePrimary"};
        let e = write_reply(&reply, "insert", "users_g1").unwrap_err();
        assert!(e.to_string().contains("10107"), "{e}");
        assert!(write_reply(&doc! {"n": 1}, "insert", "users_g1").is_err());
    }

    #[test]
    fn write_concern_setting_parses() {
        assert_eq!(
            parse_write_concern("majority").unwrap(),
            Bson::String("majority".into())
        );
        assert_eq!(parse_write_concern(" 2 ").unwrap(), Bson::Int32(2));
        assert_eq!(
            parse_write_concern("dc-east").unwrap(),
            Bson::String("dc-east".into())
        );
        assert!(parse_write_concern("").is_err());
        assert!(parse_write_concern("-1").is_err());
    }
}
