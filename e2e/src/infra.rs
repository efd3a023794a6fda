//! Private PostgreSQL + Kafka + Mongo-wire servers for the CLI's self-contained runs (`chaos`, `bench`).

use crate::{E2eError, chaos::ChaosInfra, stack::StackConfig};

fn infra(e: impl std::fmt::Display) -> E2eError {
    E2eError::Infra(e.to_string())
}

/// Servers of this run's own (deleted when dropped) and a stack configuration on them.
pub struct PrivateInfra {
    pub pg: cqrs_devstack::Postgres,
    pub chaos: ChaosInfra,
    pub database: String,
}

impl PrivateInfra {
    /// PostgreSQL is durable (fsync and synchronous commit on): these runs quote "acknowledged" figures, and
    /// the bench's pgbench baseline runs on the same server, so both pay the same commit cost.
    pub async fn start() -> Result<Self, E2eError> {
        let (pg, kafka, mongo) = tokio::join!(
            cqrs_devstack::Postgres::start_private_with(true),
            cqrs_devstack::Kafka::start_private(),
            cqrs_devstack::Mongo::start_private()
        );
        let pg = pg.map_err(infra)?;
        let database = "cqrs_e2e".to_owned();
        pg.create_database(&database).await.map_err(infra)?;
        Ok(Self {
            pg,
            chaos: ChaosInfra {
                kafka: kafka.map_err(infra)?,
                mongo: mongo.map_err(infra)?,
            },
            database,
        })
    }

    pub fn pg_url(&self) -> String {
        self.pg.url(&self.database)
    }

    /// A stack configuration on these servers; `fast` uses the cheap test argon2 settings.
    pub fn stack_config(&self, fast: bool) -> Result<StackConfig, E2eError> {
        let prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let log_dir = std::env::temp_dir().join("cqrs-e2e-logs").join(&prefix);
        std::fs::create_dir_all(&log_dir).map_err(infra)?;
        let mut extra = if fast {
            crate::stack::fast_test_env()
        } else {
            vec![("RUST_LOG".to_owned(), "info".to_owned())]
        };
        extra.push(("GATEWAY_MAX_IN_FLIGHT".into(), "4096".into()));
        Ok(StackConfig {
            pg_url: self.pg_url(),
            kafka_bootstrap: self.chaos.kafka.bootstrap(),
            topic_prefix: prefix.clone(),
            mongo_url: self.chaos.mongo.url(),
            mongo_db: prefix.replace('-', "_"),
            jwt_secret: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            bin_dir: crate::stack::bin_dir()?,
            log_dir,
            extra_env: extra,
        })
    }
}
