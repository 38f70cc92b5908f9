//! Connections to PostgreSQL (usage rollups, grants), with TLS the way
//! libpq users configure it: in the connection string.
//!
//! - `sslmode`: `disable` (plain TCP), `prefer` (TLS when the server
//!   offers it, else plain; the default, as in libpq), `require` (TLS or
//!   nothing), `verify-ca` (TLS, the server's chain checked against
//!   `sslrootcert`), `verify-full` (that, and the certificate names the
//!   host connected to: a DNS name or an IP address of `host`). As in
//!   libpq, `require` with `sslrootcert` checks the chain like
//!   `verify-ca`; `prefer` and `require` without it check nothing (they
//!   protect against eavesdropping, not against a server in the middle).
//! - `sslrootcert`: a PEM file of CA certificates (read at every
//!   connection, so a rotated file is picked up); `verify-ca` and
//!   `verify-full` need it (libpq's `~/.postgresql/root.crt` fallback and
//!   `system` are not supported: name the file).
//!
//! Both forms carry them: `host=db sslmode=verify-full
//! sslrootcert=/etc/pg/ca.pem` or
//! `postgresql://db/x?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem`.
//! TLS is rustls (ring); client certificates (`sslcert`, `sslkey`) are not
//! supported and refused as unknown options. [`redact_conninfo`] is what
//! may be logged of a connection string.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection's I/O half (poll it, or spawn it, for the client to work).
pub type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err("sslmode: \"allow\" is not supported (use prefer)".into()),
            other => {
                return Err(format!(
                    "sslmode: {other:?} is not disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

/// A connection string read: what tokio-postgres takes, and the TLS of it.
#[derive(Debug)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub mode: SslMode,
    pub root_cert: Option<String>,
}

impl Target {
    /// Reads `conninfo` (key=value or URL); errors name the option.
    pub fn parse(conninfo: &str) -> Result<Target, String> {
        let (rest, mode, root) = if is_url(conninfo) {
            split_url(conninfo)
        } else {
            split_pairs(conninfo)
        };
        let mode = match mode {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root.is_none() {
            return Err(format!(
                "sslrootcert: sslmode={} needs the CA file (sslrootcert=/path/ca.pem)",
                if mode == SslMode::VerifyCa {
                    "verify-ca"
                } else {
                    "verify-full"
                }
            ));
        }
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| format!("postgres connection string: {e}"))?;
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Target {
            config,
            mode,
            root_cert: root,
        })
    }

    /// The TLS client for this target (the CA file read now).
    pub fn tls(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.root_cert {
            None => Arc::new(NoVerification(provider)),
            Some(path) => {
                let roots = pem_roots(path).map_err(|e| format!("sslrootcert: {e}"))?;
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("sslrootcert: {path}: {e}"))?;
                if self.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// Connects; the connection's I/O half is the caller's to drive.
    pub async fn connect(&self) -> Result<(Client, Connection), String> {
        let tls = self.tls()?;
        self.config.connect(tls).await.map_err(|e| error_chain(&e))
    }
}

/// The CA certificates of the PEM file at `path` (errors name the file).
pub fn pem_roots(path: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))?;
    for c in certs {
        let c = c.map_err(|e| format!("{path}: {e}"))?;
        roots.add(c).map_err(|e| format!("{path}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{path}: no certificate in the file"));
    }
    Ok(roots)
}

/// Whether `conninfo` can be connected with: its options, and the CA file
/// read (a start check: what is wrong names the option).
pub fn check(conninfo: &str) -> Result<(), String> {
    Target::parse(conninfo)?.tls().map(|_| ())
}

/// An error and its causes, `a: b: c` (tokio-postgres keeps the TLS
/// reason in the source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// Connects to `conninfo` and spawns the connection (its end is logged).
pub async fn connect(conninfo: &str) -> Result<Client, String> {
    let (client, conn) = Target::parse(conninfo)?
        .connect()
        .await
        .map_err(|e| format!("postgres: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %error_chain(&e), "postgres: the connection failed");
        }
    });
    Ok(client)
}

fn is_url(s: &str) -> bool {
    let t = s.trim_start();
    t.starts_with("postgres://") || t.starts_with("postgresql://")
}

/// The URL without its `sslmode` and `sslrootcert` parameters, and them.
fn split_url(s: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = s.split_once('?') else {
        return (s.to_string(), None, None);
    };
    let (mut mode, mut root, mut kept) = (None, None, Vec::new());
    for p in query.split('&') {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let v = filter_common::form::decode(v).unwrap_or_else(|| v.to_string());
        match k {
            "sslmode" => mode = Some(v),
            "sslrootcert" => root = Some(v),
            _ => kept.push(p),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, mode, root)
}

/// The key=value string without its `sslmode` and `sslrootcert` pairs,
/// and their values.
fn split_pairs(s: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root, mut rest, mut at) = (None, None, String::new(), 0);
    for p in pairs(s) {
        match p.key {
            "sslmode" | "sslrootcert" => {
                rest.push_str(&s[at..p.start]);
                at = p.end;
                let v = Some(p.value);
                if p.key == "sslmode" {
                    mode = v;
                } else {
                    root = v;
                }
            }
            _ => {}
        }
    }
    rest.push_str(&s[at..]);
    (rest, mode, root)
}

/// `s` with its password replaced by `<redacted>`: the URL form's user
/// info and `password=` parameter, or the `password` pair of the
/// key=value form (quoted or not). What may be logged.
pub fn redact_conninfo(s: &str) -> String {
    use crate::config::REDACTED;
    if is_url(s) {
        let url = crate::config::redact_url(s);
        let Some((base, query)) = url.split_once('?') else {
            return url;
        };
        let query: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some(("password", _)) => format!("password={REDACTED}"),
                _ => p.to_string(),
            })
            .collect();
        return format!("{base}?{}", query.join("&"));
    }
    let (mut out, mut at) = (String::with_capacity(s.len()), 0);
    for p in pairs(s).into_iter().filter(|p| p.key == "password") {
        out.push_str(&s[at..p.value_start]);
        out.push_str(REDACTED);
        at = p.end;
    }
    out.push_str(&s[at..]);
    out
}

/// One `key = value` pair of a key=value connection string: the key, the
/// value unquoted (libpq's `'…'` with `\'` and `\\`), and byte offsets:
/// `start` (the key), `value_start`, `end` (after the value).
#[derive(Debug)]
struct Pair<'a> {
    key: &'a str,
    value: String,
    start: usize,
    value_start: usize,
    end: usize,
}

/// The pairs of `s`; parsing stops at the first thing that is not one
/// (tokio-postgres then says what is wrong).
fn pairs(s: &str) -> Vec<Pair<'_>> {
    let b = s.as_bytes();
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = skip_ws(0);
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        let eq = skip_ws(i);
        if b.get(eq) != Some(&b'=') || key.is_empty() {
            break;
        }
        let value_start = skip_ws(eq + 1);
        let mut value = Vec::new();
        let mut j = value_start;
        let quoted = b.get(j) == Some(&b'\'');
        if quoted {
            j += 1;
        }
        while j < b.len() {
            let c = b[j];
            if quoted && c == b'\'' {
                j += 1;
                break;
            }
            if !quoted && c.is_ascii_whitespace() {
                break;
            }
            if c == b'\\' && j + 1 < b.len() {
                j += 1;
            }
            value.push(b[j]);
            j += 1;
        }
        out.push(Pair {
            key,
            value: String::from_utf8_lossy(&value).into_owned(),
            start,
            value_start,
            end: j,
        });
        i = skip_ws(j);
    }
    out
}

/// `verify-ca`: the chain is checked, the name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name: a name error means the
        // chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require` without a CA file: encrypted, the certificate not
/// checked (the handshake's signatures still are).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_passwords_are_redacted_in_both_forms() {
        for (given, want) in [
            (
                "host=db user=u password=s3cret dbname=x",
                "host=db user=u password=<redacted> dbname=x",
            ),
            (
                "host=db password = 'it\\'s secret' sslmode=require",
                "host=db password = <redacted> sslmode=require",
            ),
            (
                "password='a b \\' c' host=db",
                "password=<redacted> host=db",
            ),
            ("host=db user=u", "host=db user=u"),
            (
                "postgresql://u:s3cret@db:5432/x?sslmode=require",
                "postgresql://<redacted>@db:5432/x?sslmode=require",
            ),
            (
                "postgres://db/x?user=u&password=s3cret&sslmode=require",
                "postgres://db/x?user=u&password=<redacted>&sslmode=require",
            ),
        ] {
            assert_eq!(redact_conninfo(given), want, "{given}");
        }
    }

    #[test]
    fn tls_options_are_taken_out_of_both_forms() {
        let t =
            Target::parse("host=db sslmode = verify-full  sslrootcert='/etc/pg/c a.pem' dbname=x")
                .unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some("/etc/pg/c a.pem"));
        assert_eq!(t.config.get_dbname(), Some("x"));
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let t = Target::parse(
            "postgresql://u@db/x?sslmode=verify-ca&sslrootcert=%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            (t.mode, t.root_cert.as_deref()),
            (SslMode::VerifyCa, Some("/ca.pem"))
        );
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        let t = Target::parse("host=db").unwrap();
        assert_eq!((t.mode, t.root_cert), (SslMode::Prefer, None));
        let t = Target::parse("host=db sslmode=disable").unwrap();
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn bad_tls_options_name_the_option() {
        for (given, want) in [
            ("host=db sslmode=verify", "sslmode: \"verify\" is not"),
            (
                "host=db sslmode=allow",
                "sslmode: \"allow\" is not supported",
            ),
            (
                "host=db sslmode=verify-full",
                "sslrootcert: sslmode=verify-full needs",
            ),
            (
                "postgres://db?sslmode=verify-ca",
                "sslrootcert: sslmode=verify-ca needs",
            ),
        ] {
            let e = Target::parse(given).unwrap_err();
            assert!(e.starts_with(want), "{given}: {e}");
        }
        let t = Target::parse("host=db sslmode=require sslrootcert=/nonexistent/ca.pem").unwrap();
        let e = t.tls().err().unwrap();
        assert!(e.starts_with("sslrootcert: /nonexistent/ca.pem: "), "{e}");
    }
}
