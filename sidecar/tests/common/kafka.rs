//! A real Kafka-protocol broker for a test: tansu (crates.io; installed by
//! `scripts/ensure-deps.sh kafka`) on a free loopback port with SQLite
//! storage in a directory of its own; it can be killed and started again
//! on the same port and storage. And a client to make topics and produce.
#![allow(dead_code)]

use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The tansu binary: `$TANSU`, else where `scripts/ensure-deps.sh kafka`
/// puts it, else `tansu` on the PATH.
pub fn tansu() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU") {
        return p.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default();
    let cached = cache.join("254carbon/tansu-0.6.0/bin/tansu");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("tansu")
}

pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    pub async fn start() -> Broker {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("254carbon-tansu-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = Broker {
            port,
            dir,
            child: None,
        };
        b.resume().await;
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) and waits until it accepts connections.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "the broker runs already");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let bin = tansu();
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run the Kafka broker {}: {e} (scripts/ensure-deps.sh kafka installs it)",
                    bin.display()
                )
            });
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the broker did not listen on {} within 5 s: {}",
            self.addr(),
            self.log()
        );
    }

    /// Kills the broker (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        ClientBuilder::new(vec![self.addr()]).build().await.unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes `topic` with `partitions` partitions.
pub async fn create_topic(client: &Client, topic: &str, partitions: i32) {
    client
        .controller_client()
        .unwrap()
        .create_topic(topic, partitions, 1, 5_000)
        .await
        .unwrap();
}

/// Produces one record to partition `p`; its offset.
pub async fn produce(
    client: &Client,
    topic: &str,
    p: i32,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> i64 {
    let pc = client
        .partition_client(topic, p, UnknownTopicHandling::Retry)
        .await
        .unwrap();
    let r = Record {
        key: key.map(<[u8]>::to_vec),
        value: value.map(<[u8]>::to_vec),
        headers: BTreeMap::new(),
        timestamp: rskafka::chrono::DateTime::from_timestamp_millis(1_790_000_000_000).unwrap(),
    };
    pc.produce(vec![r], Compression::NoCompression)
        .await
        .unwrap()[0]
}
