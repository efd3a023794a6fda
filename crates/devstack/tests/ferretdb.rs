//! FerretDB, the alternative Mongo-wire server (`CQRS_MONGO_SERVER=ferretdb`), keeps doing what the query
//! service needs from it: inserts, unique indexes, and the version-guarded upsert of `Store::write_batch`, one
//! statement per command. (Known gaps of FerretDB v1.24.2, not asserted here: an unordered `update` stops at its
//! first write error and reports it at index 0; an `update` with 100 statements that match existing documents
//! never answers; SQLite lookups by `_id` scan the collection.) The first run builds FerretDB (about a minute).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cqrs_devstack::{Mongo, MongoServer};
use mongodb::bson::{Bson, Document, doc};

fn write_error_codes(reply: &Document) -> Vec<i32> {
    reply
        .get_array("writeErrors")
        .map(|a| {
            a.iter()
                .filter_map(Bson::as_document)
                .map(|e| e.get_i32("code").unwrap_or(-1))
                .collect()
        })
        .unwrap_or_default()
}

/// One statement as `Store::write_batch` sends it: replace the document if it is older than `version`, else
/// let the upsert collide on `_id`.
fn guarded(id: &str, version: i64, name: &str) -> Document {
    doc! {
        "update": "products",
        "updates": [{
            "q": {"_id": id, "version": {"$lt": version}},
            "u": {"_id": id, "name": name, "version": version},
            "upsert": true,
        }],
        "ordered": false,
        "writeConcern": {"w": "majority"},
    }
}

#[tokio::test]
async fn ferretdb_inserts_rejects_duplicates_and_applies_guarded_upserts() {
    let mut mongo = Mongo::start_private_with(MongoServer::FerretSqlite)
        .await
        .unwrap();
    assert_eq!(mongo.server(), &MongoServer::FerretSqlite);
    let client = mongodb::Client::with_uri_str(mongo.url()).await.unwrap();
    let db = client.database("proof");

    // A unique secondary index rejects a duplicate with MongoDB's code.
    common::unique_index_rejects_a_duplicate(&db).await;

    // An unordered insert reports each duplicate `_id` at its index and inserts the rest.
    let reply = db
        .run_command(doc! {
            "insert": "products",
            "documents": [{"_id": "p1", "name": "a", "version": 1_i64}, {"_id": "p1"}, {"_id": "p2", "version": 1_i64}],
            "ordered": false, "writeConcern": {"w": "majority"},
        })
        .await
        .unwrap();
    assert_eq!(reply.get_i32("n").unwrap(), 2, "{reply}");
    let errs = reply.get_array("writeErrors").unwrap();
    assert_eq!(errs.len(), 1, "{reply}");
    let e = errs[0].as_document().unwrap();
    assert_eq!(
        (e.get_i32("index").unwrap(), e.get_i32("code").unwrap()),
        (1, 11000)
    );

    // Guarded upserts: older → replaced; already at that version → duplicate key; missing → created.
    let reply = db.run_command(guarded("p1", 2, "b")).await.unwrap();
    assert!(write_error_codes(&reply).is_empty(), "{reply}");
    assert_eq!(reply.get_i32("nModified").unwrap(), 1, "{reply}");
    let reply = db.run_command(guarded("p1", 2, "stale")).await.unwrap();
    assert_eq!(write_error_codes(&reply), vec![11000], "{reply}");
    let reply = db.run_command(guarded("p3", 1, "new")).await.unwrap();
    assert!(write_error_codes(&reply).is_empty(), "{reply}");
    assert_eq!(reply.get_array("upserted").unwrap().len(), 1, "{reply}");

    // A `kill -9` loses nothing acknowledged (a private server syncs every commit).
    mongo.kill().unwrap();
    mongo.start().await.unwrap();
    let client = mongodb::Client::with_uri_str(mongo.url()).await.unwrap();
    let products = client.database("proof").collection::<Document>("products");
    let p1 = products
        .find_one(doc! {"_id": "p1"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (p1.get_str("name").unwrap(), p1.get_i64("version").unwrap()),
        ("b", 2)
    );
    assert_eq!(products.count_documents(doc! {}).await.unwrap(), 3);
}
