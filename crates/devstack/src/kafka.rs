//! Apache Kafka 4.3.1 in KRaft mode (one combined broker+controller node) from Maven Central jars.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

use crate::{DevstackError, Installer, Result, error::IoContext, proc, proc::ServerProcess};

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub port: u16,
    pub controller_port: u16,
    /// Holds `server.properties`, `log4j2.properties`, `data/` and `log`.
    pub dir: PathBuf,
    /// JVM heap (`-Xmx`), e.g. "768m".
    pub heap: String,
    /// The address clients use (listened on and advertised); the controller stays on 127.0.0.1.
    pub host: String,
}

/// One Kafka node. Dropping a private one kills it and deletes its files.
#[derive(Debug)]
pub struct Kafka {
    cfg: KafkaConfig,
    libs: PathBuf,
    process: ServerProcess,
    owned: bool,
}

impl KafkaConfig {
    pub fn ephemeral(dir: PathBuf) -> Result<Self> {
        Ok(Self {
            port: proc::free_port()?,
            controller_port: proc::free_port()?,
            dir,
            heap: "768m".into(),
            host: proc::loopback(),
        })
    }
}

impl Kafka {
    /// A broker of this test's own on free ports, deleted on drop. ~10 s to start, ~1 GB of memory.
    pub async fn start_private() -> Result<Self> {
        let dir = crate::cache_dir()
            .join("run")
            .join(format!("kafka-private-{}", uuid::Uuid::new_v4().simple()));
        let mut k = Self::start_with(KafkaConfig::ephemeral(dir)?).await?;
        k.owned = true;
        Ok(k)
    }

    /// Formats (first time only) and starts the node described by `cfg`; it keeps running after drop.
    pub async fn start_with(cfg: KafkaConfig) -> Result<Self> {
        let libs = Installer::global().kafka_libs().await?;
        let mut k = Self {
            cfg,
            libs,
            process: ServerProcess::default(),
            owned: false,
        };
        k.write_config()?;
        k.format()?;
        k.start().await?;
        Ok(k)
    }

    pub(crate) async fn attach(cfg: KafkaConfig, pid: u32) -> Result<Self> {
        let libs = Installer::global().kafka_libs().await?;
        Ok(Self {
            cfg,
            libs,
            process: ServerProcess::attached(pid),
            owned: false,
        })
    }

    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.cfg.host, self.cfg.port)
    }
    pub fn port(&self) -> u16 {
        self.cfg.port
    }
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
    pub fn log_path(&self) -> PathBuf {
        self.cfg.dir.join("log")
    }

    fn classpath(&self) -> String {
        format!("{}/*", self.libs.display())
    }

    fn write_config(&self) -> Result<()> {
        let KafkaConfig {
            port,
            controller_port,
            dir,
            host,
            ..
        } = &self.cfg;
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let data = dir.join("data");
        // Single node: every internal topic has replication factor 1. Topics are created explicitly by the
        // services (auto-create would hide a missing topic and create it with the wrong partition count).
        let props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}\n\
             listeners=PLAINTEXT://{host}:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://{host}:{port}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=3\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=10\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             log.retention.hours=-1\n",
            data = data.display()
        );
        std::fs::write(dir.join("server.properties"), props)
            .ctx(|| "writing server.properties".into())?;
        let log4j = "status = warn\n\
            appender.console.type = Console\n\
            appender.console.name = STDOUT\n\
            appender.console.layout.type = PatternLayout\n\
            appender.console.layout.pattern = [%d] %p %m (%c)%n\n\
            rootLogger.level = INFO\n\
            rootLogger.appenderRef.stdout.ref = STDOUT\n\
            logger.kafka.name = kafka\n\
            logger.kafka.level = INFO\n\
            logger.controller.name = org.apache.kafka.controller\n\
            logger.controller.level = WARN\n\
            logger.coord.name = org.apache.kafka.coordinator\n\
            logger.coord.level = WARN\n";
        std::fs::write(dir.join("log4j2.properties"), log4j)
            .ctx(|| "writing log4j2.properties".into())
    }

    fn java(&self, heap: &str) -> Command {
        let mut c = Command::new("java");
        c.arg(format!("-Xmx{heap}"))
            .arg(format!("-Xms{}", "256m"))
            .arg("-XX:+UseG1GC")
            .arg("-XX:TieredStopAtLevel=1")
            .arg("-Djava.awt.headless=true")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.cfg.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(self.classpath());
        c
    }

    fn format(&self) -> Result<()> {
        if self.cfg.dir.join("data").join("meta.properties").exists() {
            return Ok(());
        }
        let mut c = self.java("512m");
        c.args(["kafka.tools.StorageTool", "random-uuid"]);
        let id = proc::run(c, "kafka StorageTool random-uuid")?;
        let id = id.lines().last().unwrap_or_default().trim().to_owned();
        let mut c = self.java("512m");
        c.args([
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            &id,
            "-c",
        ])
        .arg(self.cfg.dir.join("server.properties"));
        proc::run(c, "kafka StorageTool format").map(|_| ())
    }

    /// Starts the broker (again) and waits until it answers a metadata request.
    pub async fn start(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        let mut c = self.java(&self.cfg.heap.clone());
        c.arg("kafka.Kafka")
            .arg(self.cfg.dir.join("server.properties"));
        let child = proc::spawn_detached(c, &self.log_path())?;
        self.process = ServerProcess::spawned(child);
        self.wait_ready(Duration::from_secs(120)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let bootstrap = self.bootstrap();
        loop {
            if let Some(status) = self.process.exited() {
                return Err(DevstackError::Exited {
                    server: "kafka",
                    status: status.to_string(),
                    log: self.log_path(),
                });
            }
            let b = bootstrap.clone();
            let ok = tokio::task::spawn_blocking(move || metadata_ok(&b))
                .await
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DevstackError::NotReady {
                    server: "kafka",
                    seconds: timeout.as_secs(),
                    log: self.log_path(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Controlled shutdown (SIGTERM), waiting for the process to exit.
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop(Duration::from_secs(30)).await;
        Ok(())
    }

    /// `kill -9`: no controlled shutdown, like a crashed node.
    pub fn kill(&mut self) -> Result<()> {
        self.process.kill();
        Ok(())
    }

    pub fn running(&self) -> bool {
        self.process.running()
    }

    pub(crate) async fn destroy(&mut self) -> Result<()> {
        self.stop().await?;
        proc::remove_dir(&self.cfg.dir)
    }
}

/// One metadata round trip that lists a broker: the broker accepts clients.
pub(crate) fn metadata_ok(bootstrap: &str) -> bool {
    let consumer: Result<BaseConsumer, _> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create();
    match consumer {
        Ok(c) => c
            .fetch_metadata(None, Duration::from_millis(1500))
            .map(|m| !m.brokers().is_empty())
            .unwrap_or(false),
        Err(_) => false,
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.kill();
            let _ = std::fs::remove_dir_all(&self.cfg.dir);
        }
    }
}
