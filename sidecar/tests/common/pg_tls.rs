//! A PostgreSQL server of the test's own on a free loopback port, TLS only
//! (`hostssl` trust, `hostnossl` reject), with a certificate for
//! `localhost` from a CA generated here; stopped and removed at the end.
//! Uses the machine's PostgreSQL binaries (Debian's `postgresql` package,
//! which the test command installs when missing); run as root, the server
//! runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct TlsPostgres {
    pub port: u16,
    dir: PathBuf,
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// Another CA, which signed nothing of this server's.
    pub other_ca: PathBuf,
    bin: PathBuf,
    user: Option<String>,
}

/// The directory of `initdb` and `pg_ctl`.
fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.join("initdb").exists() {
            return p;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect(
        "no PostgreSQL binaries (initdb) in pg_config --bindir or /usr/lib/postgresql/*/bin",
    )
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn ca(name: &str) -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, String) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let issuer =
        rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
    let pem = issuer.pem();
    (issuer, pem)
}

impl TlsPostgres {
    pub fn start() -> TlsPostgres {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sidecar-pgtls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        // Root may not run PostgreSQL: the server runs as `postgres`.
        let user = (id(&["-u"]) == 0).then(|| "postgres".to_string());
        if user.is_some() {
            let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let pg = TlsPostgres {
            port,
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            dir,
            bin: bindir(),
            user,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );

        let (issuer, ca_pem) = ca("sidecar test CA");
        let (_, other_pem) = ca("another CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(&pg.ca, ca_pem).unwrap();
        std::fs::write(&pg.other_ca, other_pem).unwrap();
        pg.write_owned(&data.join("server.crt"), cert.pem().as_bytes(), 0o644);
        pg.write_owned(
            &data.join("server.key"),
            key.serialize_pem().as_bytes(),
            0o600,
        );
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             fsync = off\nmax_connections = 20\nshared_buffers = 16MB\n",
            pg.dir.display()
        ));
        pg.write_owned(&data.join("postgresql.conf"), conf.as_bytes(), 0o600);
        pg.write_owned(
            &data.join("pg_hba.conf"),
            b"local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            0o600,
        );
        pg.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                pg.dir.join("server.log").to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        pg
    }

    fn write_owned(&self, path: &Path, bytes: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        if self.user.is_some() {
            let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }

    /// `tool` of the PostgreSQL binaries, as the server's user.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut c = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        c.current_dir(&self.dir);
        c
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }

    /// libpq key=value for this server as `host` (without TLS options).
    pub fn conninfo(&self, host: &str) -> String {
        format!(
            "host={host} port={} user=postgres dbname=postgres connect_timeout=5",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
