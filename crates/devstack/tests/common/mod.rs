//! Checks shared by the devstack's test binaries.
#![allow(clippy::unwrap_used)]

use mongodb::bson::{Document, doc};

/// A unique secondary index on `users.email` of `db` rejects a second document with the same email with
/// MongoDB's duplicate-key code (11000).
pub async fn unique_index_rejects_a_duplicate(db: &mongodb::Database) {
    let users = db.collection::<Document>("users");
    users
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    users
        .insert_one(doc! {"_id": "u1", "email": "a@example.com"})
        .await
        .unwrap();
    let err = users
        .insert_one(doc! {"_id": "u2", "email": "a@example.com"})
        .await
        .unwrap_err();
    match *err.kind {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(ref w)) => {
            assert_eq!(w.code, 11000)
        }
        ref other => panic!("expected a duplicate key error, got {other:?}"),
    }
}
