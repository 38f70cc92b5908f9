//! Real Redis topologies for a test, started by the test itself on free
//! loopback ports and stopped on drop (also when the test panics): a single
//! server, a Sentinel set (a master, a replica and three sentinels) and a
//! Cluster of N masters. Everything is synchronous (std::process, std::net,
//! std::thread::sleep), so it works in a `#[test]` before or after a tokio
//! runtime. The harness talks to the servers with a small RESP client of its
//! own (std::net, with timeouts), independent of the `redis` crate the
//! service uses; `redis-cli` only runs `--cluster create`.
//!
//! Each process gets a directory of its own under `std::env::temp_dir()`
//! with its `redis.conf` (written once; a restart reuses it, and Sentinel
//! may rewrite it, as it does in production), `redis.log` (`logfile`) and
//! `stdio.log` (what it printed before the log file opened). Panics say what
//! did not happen and include the logs' tails.
//!
//! Note for the test files that `use common::*;`: the glob brings this
//! module in as `redis`, which shadows the `redis` crate there; name the
//! crate `::redis` in such files.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

const HINT: &str = "run scripts/ensure-deps.sh services";
/// How long a process may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Sentinel::start` and `Cluster::start` wait for the topology.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Binaries, ports, directories
// ---------------------------------------------------------------------------

/// `name` on the PATH, if there.
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|f| f.is_file())
}

/// `name` on the PATH, or a panic saying how to install it.
fn bin(name: &str) -> PathBuf {
    find(name).unwrap_or_else(|| panic!("{name} is not on the PATH: {HINT}"))
}

/// Ports this process handed out already (client and cluster bus ports):
/// never handed out twice, even after their server is gone.
static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Claims `port` against the other processes on this machine that use
/// this harness (other test binaries, other checkouts' tests): an abstract
/// Unix socket named after it, held until this process ends. Without it a
/// port freed by a killed server could go to another process's server
/// before the restart, and two Sentinel sets of the same master name could
/// find each other.
#[cfg(target_os = "linux")]
fn claim(port: u16) -> bool {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    static CLAIMS: Mutex<Vec<UnixDatagram>> = Mutex::new(Vec::new());
    let Ok(name) = UnixAddr::from_abstract_name(format!("254carbon-redis-port-{port}")) else {
        return true;
    };
    match UnixDatagram::bind_addr(&name) {
        Ok(s) => {
            CLAIMS.lock().unwrap_or_else(|e| e.into_inner()).push(s);
            true
        }
        Err(_) => false,
    }
}

#[cfg(not(target_os = "linux"))]
fn claim(_port: u16) -> bool {
    true
}

/// A free loopback port below 55535 whose port + 10000 (a cluster node's
/// bus port) is free too: the OS picks it (bind 127.0.0.1:0), we drop it.
/// A start that still finds it taken retries with another (`launch`).
fn free_port() -> u16 {
    for _ in 0..500 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if port >= 55535 {
            continue;
        }
        let bus = port + 10000;
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        if taken.contains(&port) || taken.contains(&bus) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", bus)).is_err() {
            continue;
        }
        if !claim(port) {
            continue;
        }
        taken.insert(port);
        if !claim(bus) {
            continue;
        }
        taken.insert(bus);
        return port;
    }
    panic!("no free loopback port pair (port, port + 10000) found");
}

/// A directory under the temp dir, removed on drop (after the processes in
/// it: the structs below declare it last).
struct Root(PathBuf);

impl Root {
    fn new(kind: &str) -> Root {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "254carbon-redis-{kind}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Root(dir)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A path quoted for redis.conf.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The configuration of a data server on `port` in `dir`, plus `extra`
/// lines. `set-proc-title no` keeps the command line (with the config's
/// path, thus the directory) visible to `pgrep -f`.
fn server_conf(port: u16, dir: &Path, extra: &str) -> String {
    format!(
        "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\ndaemonize no\nset-proc-title no\n\
         save \"\"\nappendonly no\nrepl-diskless-sync-delay 0\n{extra}",
        quote(dir),
        quote(&dir.join("redis.log")),
    )
}

fn sentinel_conf(port: u16, dir: &Path, name: &str, master: u16) -> String {
    format!(
        "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\ndaemonize no\nset-proc-title no\n\
         sentinel monitor {name} 127.0.0.1 {master} 2\n\
         sentinel down-after-milliseconds {name} 1000\n\
         sentinel failover-timeout {name} 3000\n\
         sentinel parallel-syncs {name} 1\n",
        quote(dir),
        quote(&dir.join("redis.log")),
    )
}

const CLUSTER_CONF: &str =
    "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-node-timeout 2000\n";

/// The last `n` lines of a file, or a note that it is not there.
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

// ---------------------------------------------------------------------------
// RESP
// ---------------------------------------------------------------------------

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Status(String),
    Error(String),
    Int(i64),
    Bulk(String),
    Array(Vec<Reply>),
}

impl Reply {
    /// The text of a status, error or bulk reply, an integer in decimal;
    /// empty for nil and arrays.
    pub fn text(&self) -> String {
        match self {
            Reply::Status(s) | Reply::Error(s) | Reply::Bulk(s) => s.clone(),
            Reply::Int(i) => i.to_string(),
            Reply::Nil | Reply::Array(_) => String::new(),
        }
    }

    /// The elements of an array reply; empty for anything else.
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(a) => a,
            _ => &[],
        }
    }

    /// The value after `name` in a flat `[name, value, ...]` array (what
    /// `SENTINEL master` and its kin return).
    pub fn field(&self, name: &str) -> Option<String> {
        self.items()
            .chunks(2)
            .find(|kv| kv.len() == 2 && kv[0].text() == name)
            .map(|kv| kv[1].text())
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }
}

/// Credentials for the harness's own commands to a server.
#[derive(Debug, Clone)]
struct Auth {
    user: Option<String>,
    password: String,
}

fn encode(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    let num = || -> io::Result<i64> {
        rest.parse()
            .map_err(|_| bad(format!("bad RESP line {line:?}")))
    };
    Ok(match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(num()?),
        "$" => match usize::try_from(num()?) {
            Err(_) => Reply::Nil,
            Ok(n) => {
                let mut b = vec![0; n + 2];
                r.read_exact(&mut b)?;
                b.truncate(n);
                Reply::Bulk(String::from_utf8_lossy(&b).into_owned())
            }
        },
        "*" => match usize::try_from(num()?) {
            Err(_) => Reply::Nil,
            Ok(n) => Reply::Array((0..n).map(|_| read_reply(r)).collect::<io::Result<_>>()?),
        },
        _ => return Err(bad(format!("bad RESP line {line:?}"))),
    })
}

fn command_auth(port: u16, auth: Option<&Auth>, args: &[&str]) -> io::Result<Reply> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut out = Vec::new();
    if let Some(a) = auth {
        match &a.user {
            Some(u) => encode(&mut out, &["AUTH", u, &a.password]),
            None => encode(&mut out, &["AUTH", &a.password]),
        }
    }
    encode(&mut out, args);
    (&s).write_all(&out)?;
    let mut r = BufReader::new(&s);
    if auth.is_some() {
        if let e @ Reply::Error(_) = read_reply(&mut r)? {
            return Ok(e);
        }
    }
    read_reply(&mut r)
}

/// One command to the server on 127.0.0.1:`port`, on a connection of its
/// own (1 s to connect, 5 s to answer); error replies are `Ok(Reply::Error)`.
pub fn command(port: u16, args: &[&str]) -> io::Result<Reply> {
    command_auth(port, None, args)
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// One redis-server (or sentinel) process: killed on drop.
struct Proc {
    name: String,
    port: u16,
    dir: PathBuf,
    program: PathBuf,
    /// Arguments after the config file's path.
    args: Vec<String>,
    auth: Option<Auth>,
    child: Option<Child>,
}

impl Proc {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether the process runs (false once it was killed or exited).
    fn running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn cmd(&self, args: &[&str]) -> io::Result<Reply> {
        command_auth(self.port, self.auth.as_ref(), args)
    }

    /// Starts the process from its config and waits until it answers.
    fn spawn(&mut self) -> Result<(), String> {
        self.spawn_with(&[])
    }

    /// Starts the process from its config, with `extra` arguments this
    /// time, and waits until it answers.
    fn spawn_with(&mut self, extra: &[String]) -> Result<(), String> {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let stdio = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("stdio.log"))
            .map_err(|e| format!("open {}/stdio.log: {e}", self.dir.display()))?;
        let child = Command::new(&self.program)
            .arg(self.dir.join("redis.conf"))
            .args(&self.args)
            .args(extra)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdio.try_clone().map_err(|e| e.to_string())?)
            .stderr(stdio)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e} ({HINT})", self.program.display()))?;
        self.child = Some(child);
        let r = self.wait_up(START_TIMEOUT);
        if r.is_err() {
            self.kill();
        }
        r
    }

    /// Waits until the process answers `INFO server` with its own pid (not
    /// some other server that took the port), or refuses it for want of
    /// credentials while running.
    fn wait_up(&mut self, timeout: Duration) -> Result<(), String> {
        let pid = self.pid().unwrap_or_default();
        let me = format!("process_id:{pid}");
        let deadline = Instant::now() + timeout;
        loop {
            if !self.running() {
                return Err(format!(
                    "{} (pid {pid}) exited before it answered on {}:\n{}",
                    self.name,
                    self.addr(),
                    self.logs()
                ));
            }
            match self.cmd(&["INFO", "server"]) {
                Ok(Reply::Bulk(info)) if info.lines().any(|l| l.trim() == me) => return Ok(()),
                Ok(Reply::Error(e)) if !e.starts_with("LOADING") => return Ok(()),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} (pid {pid}) did not answer on {} within {timeout:?}:\n{}",
                    self.name,
                    self.addr(),
                    self.logs()
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on its port, from its config (and `extra`
    /// arguments this time).
    fn restart_with(&mut self, extra: &[String]) {
        self.kill();
        if let Err(e) = self.spawn_with(extra) {
            panic!("restart: {e}");
        }
    }

    fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// The tails of its log files.
    fn logs(&self) -> String {
        format!(
            "--- {} ({}) redis.log:\n{}\n--- stdio.log:\n{}",
            self.name,
            self.addr(),
            tail(&self.dir.join("redis.log"), 30),
            tail(&self.dir.join("stdio.log"), 10)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a new process in `dir` on a free port, with the config `conf`
/// makes for that port; a port taken meanwhile (or its bus port) means
/// another try with another port.
fn launch(
    name: &str,
    dir: PathBuf,
    program: &Path,
    args: &[String],
    auth: Option<Auth>,
    conf: &dyn Fn(u16, &Path) -> String,
) -> Proc {
    let mut last = String::new();
    for _ in 0..5 {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let port = free_port();
        fs::write(dir.join("redis.conf"), conf(port, &dir))
            .unwrap_or_else(|e| panic!("write {}/redis.conf: {e}", dir.display()));
        let mut p = Proc {
            name: name.to_string(),
            port,
            dir: dir.clone(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            auth: auth.clone(),
            child: None,
        };
        match p.spawn() {
            Ok(()) => return p,
            Err(e) => last = e,
        }
        if !last.contains("Address already in use") {
            break;
        }
    }
    panic!("{name} did not start: {last}");
}

/// Runs a short-lived program (redis-cli) with a deadline; its output, or
/// why it failed with that output.
fn run(program: &Path, args: &[String], timeout: Duration, out: &Path) -> Result<String, String> {
    let f = File::create(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().map_err(|e| e.to_string())?)
        .stderr(f)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e} ({HINT})", program.display()))?;
    let deadline = Instant::now() + timeout;
    loop {
        let status = child.try_wait().map_err(|e| e.to_string())?;
        let text = || tail(out, 40);
        match status {
            Some(s) if s.success() => return Ok(text()),
            Some(s) => return Err(format!("exited with {s}:\n{}", text())),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {timeout:?}:\n{}", text()));
            }
            None => sleep(POLL),
        }
    }
}

/// Polls `check` until it holds or `timeout` passes; then panics with
/// `what`, the last reason `check` gave and `logs()`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
    logs: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match check() {
            Ok(()) => return,
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            panic!(
                "{what} did not happen within {timeout:?}: {why}\n{}",
                logs()
            );
        }
        sleep(POLL);
    }
}

fn info_has(info: &str, line: &str) -> bool {
    info.lines().any(|l| l.trim() == line)
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
}

// ---------------------------------------------------------------------------
// A single server
// ---------------------------------------------------------------------------

/// A redis-server on a free 127.0.0.1 port, without persistence (`save ""`,
/// `appendonly no`), in a directory of its own.
pub struct RedisServer {
    proc: Proc,
    root: Root,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With extra redis-server arguments after the config file, e.g.
    /// `["--requirepass", "secret"]` (then the harness's own commands
    /// authenticate with it), or an ACL user, one argument a word:
    /// `["--user", "svc", "on", ">pw", "~*", "+@all"]` (call `set_auth` if
    /// the default user cannot run INFO).
    pub fn start_with(args: &[&str]) -> RedisServer {
        let program = bin("redis-server");
        let root = Root::new("server");
        let auth = args
            .windows(2)
            .rev()
            .find(|w| w[0] == "--requirepass")
            .map(|w| Auth {
                user: None,
                password: w[1].to_string(),
            });
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let proc = launch(
            "redis-server",
            root.0.clone(),
            &program,
            &args,
            auth,
            &|port, dir| server_conf(port, dir, ""),
        );
        RedisServer { proc, root }
    }

    pub fn port(&self) -> u16 {
        self.proc.port
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        self.proc.addr()
    }

    /// "redis://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    pub fn dir(&self) -> &Path {
        &self.root.0
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.running()
    }

    /// The credentials the harness's own commands (`cmd`, the start-up
    /// check) use.
    pub fn set_auth(&mut self, user: Option<&str>, password: &str) {
        self.proc.auth = Some(Auth {
            user: user.map(str::to_string),
            password: password.to_string(),
        });
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Kills the server if it runs and starts it again: same port, same
    /// config, same directory (a cluster node's nodes.conf with it).
    pub fn restart(&mut self) {
        self.proc.restart();
    }

    /// One command (with the credentials, if any); panics if the server
    /// does not answer.
    pub fn cmd(&self, args: &[&str]) -> Reply {
        self.proc
            .cmd(args)
            .unwrap_or_else(|e| panic!("{args:?} to {}: {e}\n{}", self.addr(), self.log()))
    }

    /// The tail of its log.
    pub fn log(&self) -> String {
        self.proc.logs()
    }
}

// ---------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------

/// A master, a replica (`replicaof`) and three sentinels (quorum 2,
/// `down-after-milliseconds 1000`, `failover-timeout 3000`), each sentinel
/// with a config file of its own that it rewrites.
pub struct Sentinel {
    name: String,
    /// The data servers: the first master, then the first replica.
    servers: Vec<Proc>,
    sentinels: Vec<Proc>,
    root: Root,
}

impl Sentinel {
    /// Starts the set and waits (30 s at most) until a failover could
    /// happen (`wait_ready`).
    pub fn start(master_name: &str) -> Sentinel {
        assert!(
            !master_name.is_empty()
                && master_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "a master name of letters, digits, '-', '_' and '.': {master_name:?}"
        );
        let server = bin("redis-server");
        // The same binary either way; redis-sentinel is only a name for it.
        let (sentinel, sentinel_args) = match find("redis-sentinel") {
            Some(p) => (p, vec![]),
            None => (server.clone(), vec!["--sentinel".to_string()]),
        };
        let root = Root::new("sentinel");
        let mut s = Sentinel {
            name: master_name.to_string(),
            servers: Vec::new(),
            sentinels: Vec::new(),
            root,
        };
        let master = launch(
            "master",
            s.root.0.join("master"),
            &server,
            &[],
            None,
            &|p, d| server_conf(p, d, ""),
        );
        let mport = master.port;
        s.servers.push(master);
        let replica = launch(
            "replica",
            s.root.0.join("replica"),
            &server,
            &[],
            None,
            &|p, d| server_conf(p, d, &format!("replicaof 127.0.0.1 {mport}\n")),
        );
        s.servers.push(replica);
        // The sentinels learn the replicas from the master's INFO, every
        // 10 s but at once on connecting: start them after the sync.
        wait_until(
            "the replica's sync with the master",
            TOPOLOGY_TIMEOUT,
            || s.data_roles().map(|_| ()),
            || s.logs(),
        );
        for i in 0..3 {
            let p = launch(
                &format!("sentinel-{i}"),
                s.root.0.join(format!("sentinel-{i}")),
                &sentinel,
                &sentinel_args,
                None,
                &|p, d| sentinel_conf(p, d, master_name, mport),
            );
            s.sentinels.push(p);
        }
        s.wait_ready(TOPOLOGY_TIMEOUT);
        s
    }

    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// The directory of the set's processes (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.root.0
    }

    /// The sentinels' "127.0.0.1:PORT".
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(Proc::addr).collect()
    }

    /// The sentinels' "redis://127.0.0.1:PORT".
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|p| format!("redis://{}", p.addr()))
            .collect()
    }

    /// The ports of the data servers (master and replica, whatever their
    /// role now), running or not.
    pub fn server_ports(&self) -> Vec<u16> {
        self.servers.iter().map(|p| p.port).collect()
    }

    fn master_of(&self, sentinel: &Proc) -> Option<u16> {
        let r = sentinel
            .cmd(&["SENTINEL", "get-master-addr-by-name", &self.name])
            .ok()?;
        r.items().get(1)?.text().parse().ok()
    }

    /// The master's port, as the first sentinel that answers says.
    pub fn master_port(&self) -> u16 {
        self.sentinels
            .iter()
            .filter(|s| s.alive())
            .find_map(|s| self.master_of(s))
            .unwrap_or_else(|| {
                panic!(
                    "no sentinel knows the master {}:\n{}",
                    self.name,
                    self.logs()
                )
            })
    }

    /// SIGKILLs the current master (as a sentinel reports it); its port.
    /// Call `wait_ready` first if the set was changed since `start`: a
    /// failover needs the replica in sync and the sentinels aware of it.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        let p = self
            .servers
            .iter_mut()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("the sentinels report a master {port} not in the set"));
        assert!(p.running(), "the master {port} is not running");
        p.kill();
        port
    }

    /// Waits until every sentinel reports a master other than `old_port`,
    /// that server answers `ROLE` as a master, and every sentinel has a
    /// working link to it (`sees_master`); its port.
    pub fn wait_for_failover(&self, old_port: u16, timeout: Duration) -> u16 {
        let mut new = 0;
        wait_until(
            &format!("a failover from the master {old_port}"),
            timeout,
            || {
                let said: Vec<Option<u16>> = self
                    .sentinels
                    .iter()
                    .filter(|s| s.alive())
                    .map(|s| self.master_of(s))
                    .collect();
                match said.first() {
                    Some(&Some(p)) if p != old_port && said.iter().all(|s| *s == Some(p)) => {
                        let role =
                            command(p, &["ROLE"]).map_err(|e| format!("ROLE to {p}: {e}"))?;
                        match role.items().first() {
                            Some(r) if r.text() == "master" => {}
                            _ => return Err(format!("{p} answers ROLE with {role:?}")),
                        }
                        for s in self.sentinels.iter().filter(|s| s.alive()) {
                            self.sees_master(s, p)?;
                        }
                        new = p;
                        Ok(())
                    }
                    _ => Err(format!("the sentinels report the masters {said:?}")),
                }
            },
            || self.logs(),
        );
        new
    }

    /// Starts a data server again (one killed by `kill_master`, say) on its
    /// port from its config. If another server is the master now, as a
    /// replica of it (`--replicaof`): Sentinel would make it one too, but
    /// only some 10 to 20 s later. Call `wait_ready` before another
    /// failover.
    pub fn restart_server(&mut self, port: u16) {
        let master = self
            .sentinels
            .iter()
            .filter(|s| s.alive())
            .find_map(|s| self.master_of(s))
            .filter(|&m| m != port);
        let extra: Vec<String> = match master {
            Some(m) => vec!["--replicaof".into(), "127.0.0.1".into(), m.to_string()],
            None => vec![],
        };
        self.servers
            .iter_mut()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no data server on {port} in the set"))
            .restart_with(&extra);
    }

    /// The running data servers' ports: (master, replicas), if there is one
    /// master and every replica is in sync with it.
    fn data_roles(&self) -> Result<(u16, Vec<u16>), String> {
        let mut master = None;
        let mut replicas = Vec::new();
        for s in self.servers.iter().filter(|s| s.alive()) {
            let info = s
                .cmd(&["INFO", "replication"])
                .map_err(|e| format!("INFO to {}: {e}", s.name))?
                .text();
            if info_has(&info, "role:master") {
                if let Some(m) = master {
                    return Err(format!("two masters: {m} and {}", s.port));
                }
                master = Some(s.port);
            } else if info_has(&info, "master_link_status:up") {
                let of = info_field(&info, "master_port").unwrap_or_default();
                replicas.push((s.port, of.to_string()));
            } else {
                return Err(format!("{} is not in sync:\n{info}", s.name));
            }
        }
        let master = master.ok_or("no running master")?;
        if replicas.is_empty() {
            return Err("no running replica".into());
        }
        if let Some((r, of)) = replicas.iter().find(|(_, of)| *of != master.to_string()) {
            return Err(format!(
                "the replica {r} follows {of}, not the master {master}"
            ));
        }
        Ok((master, replicas.into_iter().map(|(r, _)| r).collect()))
    }

    /// `SENTINEL master` from `s`, if it says the master is on `port`, up
    /// (flags just "master", the role it reported "master") and with no
    /// PING waiting for an answer. A sentinel that switched to a new master
    /// starts a new link to it; the link counts as a waiting PING until the
    /// first answer, and one more than `down-after-milliseconds` (1 s) late
    /// makes the sentinel think the new master is down. With the stale
    /// votes of the failover just done, that means a quorum and a second
    /// failover right after the first (seen here under load).
    fn sees_master(&self, s: &Proc, port: u16) -> Result<Reply, String> {
        let m = s
            .cmd(&["SENTINEL", "master", &self.name])
            .map_err(|e| format!("SENTINEL master to {}: {e}", s.name))?;
        let ok = m.field("port") == Some(port.to_string())
            && m.field("flags").as_deref() == Some("master")
            && m.field("role-reported").as_deref() == Some("master")
            && m.field("last-ping-sent").as_deref() == Some("0");
        if ok {
            Ok(m)
        } else {
            Err(format!(
                "{} does not see a master up on {port}: {m:?}",
                s.name
            ))
        }
    }

    fn ready(&self) -> Result<(), String> {
        let (master, replicas) = self.data_roles()?;
        let others = (self.sentinels.len() - 1).to_string();
        for s in &self.sentinels {
            let ask = |what: &str| {
                s.cmd(&["SENTINEL", what, &self.name])
                    .map_err(|e| format!("SENTINEL {what} to {}: {e}", s.name))
            };
            let m = self.sees_master(s, master)?;
            if m.field("num-other-sentinels") != Some(others.clone()) {
                return Err(format!("{} knows the sentinels {m:?}", s.name));
            }
            let known = ask("replicas")?;
            for r in &replicas {
                let ok = known.items().iter().any(|e| {
                    e.field("port") == Some(r.to_string())
                        && e.field("flags").as_deref() == Some("slave")
                        && e.field("master-link-status").as_deref() == Some("ok")
                });
                if !ok {
                    return Err(format!(
                        "{} does not see the replica {r}: {known:?}",
                        s.name
                    ));
                }
            }
            let peers = ask("sentinels")?;
            let up = peers
                .items()
                .iter()
                .filter(|e| e.field("flags").as_deref() == Some("sentinel"))
                .count();
            if up != self.sentinels.len() - 1 {
                return Err(format!("{} sees the sentinels {peers:?}", s.name));
            }
        }
        Ok(())
    }

    /// Waits until a failover could happen: one master, every running
    /// replica in sync (`master_link_status:up`), and every sentinel knows
    /// the master, each replica and the other two sentinels, none down.
    pub fn wait_ready(&self, timeout: Duration) {
        wait_until(
            &format!("readiness of the Sentinel set {}", self.name),
            timeout,
            || self.ready(),
            || self.logs(),
        );
    }

    /// The tails of every process's log.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .chain(&self.sentinels)
            .map(Proc::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A Redis Cluster of N masters without replicas
/// (`cluster-node-timeout 2000`), each node in a directory of its own.
pub struct Cluster {
    nodes: Vec<Proc>,
    root: Root,
}

impl Cluster {
    /// Starts `masters` (3 at least) nodes, joins them with
    /// `redis-cli --cluster create` and waits (30 s at most) for `wait_ok`.
    pub fn start(masters: usize) -> Cluster {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs 3 masters at least, not {masters}"
        );
        let server = bin("redis-server");
        let cli = bin("redis-cli");
        let mut c = Cluster {
            nodes: Vec::new(),
            root: Root::new("cluster"),
        };
        for i in 0..masters {
            let p = launch(
                &format!("node-{i}"),
                c.root.0.join(format!("node-{i}")),
                &server,
                &[],
                None,
                &|p, d| server_conf(p, d, CLUSTER_CONF),
            );
            c.nodes.push(p);
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(c.nodes());
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        if let Err(e) = run(
            &cli,
            &args,
            Duration::from_secs(60),
            &c.root.0.join("create.log"),
        ) {
            panic!("redis-cli {}: {e}\n{}", args.join(" "), c.logs());
        }
        c.wait_ok(TOPOLOGY_TIMEOUT);
        c
    }

    /// The nodes' "127.0.0.1:PORT".
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(Proc::addr).collect()
    }

    /// The nodes' "redis://127.0.0.1:PORT".
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|p| format!("redis://{}", p.addr()))
            .collect()
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|p| p.port).collect()
    }

    /// The directory of the nodes (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.root.0
    }

    /// SIGKILLs node `i` (until `restart_node`).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// SIGKILLs node `i` if it runs, starts it again on its port with its
    /// nodes.conf, and waits (30 s at most) for `wait_ok`.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_ok(TOPOLOGY_TIMEOUT);
    }

    fn ok(&self) -> Result<(), String> {
        let want = [
            "cluster_state:ok".to_string(),
            "cluster_slots_assigned:16384".to_string(),
            "cluster_slots_ok:16384".to_string(),
            format!("cluster_known_nodes:{}", self.nodes.len()),
        ];
        for n in &self.nodes {
            if !n.alive() {
                return Err(format!("{} is not running", n.name));
            }
            let info = n
                .cmd(&["CLUSTER", "INFO"])
                .map_err(|e| format!("CLUSTER INFO to {}: {e}", n.name))?
                .text();
            if let Some(w) = want.iter().find(|w| !info_has(&info, w)) {
                return Err(format!("{} has no {w} in CLUSTER INFO:\n{info}", n.name));
            }
        }
        Ok(())
    }

    /// Waits until every node runs and says `cluster_state:ok`, with all
    /// 16384 slots assigned and ok and every node known.
    pub fn wait_ok(&self, timeout: Duration) {
        wait_until("cluster_state:ok", timeout, || self.ok(), || self.logs());
    }

    fn any_node(&self) -> &Proc {
        self.nodes
            .iter()
            .find(|n| n.alive())
            .expect("a running cluster node")
    }

    /// The slot of `key` as the cluster computes it (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let n = self.any_node();
        let r = n
            .cmd(&["CLUSTER", "KEYSLOT", key])
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT to {}: {e}", n.name));
        match r {
            Reply::Int(s) => u16::try_from(s).expect("a slot"),
            other => panic!("CLUSTER KEYSLOT {key:?}: {other:?}"),
        }
    }

    /// The index (into `nodes()`) of the node serving `slot`, after
    /// `CLUSTER SLOTS`.
    pub fn node_of_slot(&self, slot: u16) -> usize {
        let n = self.any_node();
        let r = n
            .cmd(&["CLUSTER", "SLOTS"])
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS to {}: {e}", n.name));
        let slot = i64::from(slot);
        let port = r
            .items()
            .iter()
            .find_map(|range| match range.items() {
                [Reply::Int(lo), Reply::Int(hi), master, ..] if (*lo..=*hi).contains(&slot) => {
                    master.items().get(1).map(Reply::text)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no node serves the slot {slot}: {r:?}"));
        self.nodes
            .iter()
            .position(|n| n.port.to_string() == port)
            .unwrap_or_else(|| panic!("the slot {slot} is on {port}, not a node of ours"))
    }

    /// The index (into `nodes()`) of the node serving `key`.
    pub fn node_of(&self, key: &str) -> usize {
        self.node_of_slot(slot_of(key))
    }

    /// The tails of every node's log.
    pub fn logs(&self) -> String {
        let mut s = self
            .nodes
            .iter()
            .map(Proc::logs)
            .collect::<Vec<_>>()
            .join("\n");
        let _ = write!(
            s,
            "\n--- redis-cli --cluster create:\n{}",
            tail(&self.root.0.join("create.log"), 20)
        );
        s
    }
}

/// CRC16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster uses it.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of `key`: CRC16 mod 16384 of the key, or of its hash
/// tag (what is between the first `{` and the first `}` after it, if not
/// empty).
pub fn slot_of(key: impl AsRef<[u8]>) -> u16 {
    let key = key.as_ref();
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            match rest.iter().position(|&b| b == b'}') {
                Some(0) | None => None,
                Some(close) => Some(&rest[..close]),
            }
        })
        .unwrap_or(key);
    crc16(hashed) % 16384
}
