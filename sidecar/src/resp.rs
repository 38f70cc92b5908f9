//! A minimal Redis client (RESP2 over TCP): enough for `EVALSHA`/`EVAL`
//! of the rate-limit script. One connection per client, reconnected after
//! an error; callers keep a few clients to run requests in parallel.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Nil,
    Int(i64),
    Bytes(Vec<u8>),
    Status(String),
    Array(Vec<Value>),
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    /// An error reply (`-ERR ...`).
    #[error("redis replied: {0}")]
    Reply(String),
    #[error("redis protocol: {0}")]
    Protocol(String),
}

/// Bulk strings and arrays longer than this are refused (a rate-limit
/// reply is a few integers).
const MAX_REPLY: usize = 1 << 20;

pub struct Client {
    addr: String,
    conn: Option<BufStream<TcpStream>>,
}

impl Client {
    pub fn new(addr: &str) -> Client {
        Client {
            addr: addr.to_string(),
            conn: None,
        }
    }

    /// Runs one command; on an I/O or protocol error the connection is
    /// dropped (the next command reconnects).
    pub async fn cmd(&mut self, args: &[&[u8]]) -> Result<Value, RedisError> {
        let r = self.try_cmd(args).await;
        if matches!(r, Err(RedisError::Io { .. } | RedisError::Protocol(_))) {
            self.conn = None;
        }
        r
    }

    async fn try_cmd(&mut self, args: &[&[u8]]) -> Result<Value, RedisError> {
        let io = |source| RedisError::Io {
            addr: self.addr.clone(),
            source,
        };
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr).await.map_err(io)?;
            s.set_nodelay(true).map_err(io)?;
            self.conn = Some(BufStream::new(s));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(RedisError::Protocol("no connection".into()));
        };
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        conn.write_all(&out).await.map_err(io)?;
        conn.flush().await.map_err(io)?;
        let v = read_value(conn, 0).await.map_err(|e| match e {
            ReadError::Io(source) => RedisError::Io {
                addr: self.addr.clone(),
                source,
            },
            ReadError::Protocol(p) => RedisError::Protocol(p),
        })?;
        match v {
            Reply::Err(e) => Err(RedisError::Reply(e)),
            Reply::Ok(v) => Ok(v),
        }
    }
}

enum Reply {
    Ok(Value),
    Err(String),
}

enum ReadError {
    Io(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

async fn line(conn: &mut BufStream<TcpStream>) -> Result<String, ReadError> {
    let mut l = String::new();
    let n = conn.read_line(&mut l).await?;
    if n == 0 {
        return Err(ReadError::Protocol("connection closed".into()));
    }
    if !l.ends_with("\r\n") {
        return Err(ReadError::Protocol("line without CRLF".into()));
    }
    l.truncate(l.len() - 2);
    Ok(l)
}

fn int(s: &str) -> Result<i64, ReadError> {
    s.parse()
        .map_err(|_| ReadError::Protocol(format!("bad integer {s:?}")))
}

fn read_value(
    conn: &mut BufStream<TcpStream>,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, ReadError>> + Send + '_>> {
    Box::pin(async move {
        if depth > 4 {
            return Err(ReadError::Protocol("nesting too deep".into()));
        }
        let l = line(conn).await?;
        let (kind, rest) = l.split_at(l.chars().next().map_or(0, char::len_utf8));
        Ok(match kind {
            "+" => Reply::Ok(Value::Status(rest.to_string())),
            "-" => Reply::Err(rest.to_string()),
            ":" => Reply::Ok(Value::Int(int(rest)?)),
            "$" => {
                let n = int(rest)?;
                if n < 0 {
                    return Ok(Reply::Ok(Value::Nil));
                }
                let n = usize::try_from(n).map_err(|_| ReadError::Protocol("length".into()))?;
                if n > MAX_REPLY {
                    return Err(ReadError::Protocol(format!("bulk string of {n} bytes")));
                }
                let mut b = vec![0u8; n + 2];
                conn.read_exact(&mut b).await?;
                b.truncate(n);
                Reply::Ok(Value::Bytes(b))
            }
            "*" => {
                let n = int(rest)?;
                if n < 0 {
                    return Ok(Reply::Ok(Value::Nil));
                }
                let n = usize::try_from(n).map_err(|_| ReadError::Protocol("length".into()))?;
                if n > 1024 {
                    return Err(ReadError::Protocol(format!("array of {n} elements")));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    match read_value(conn, depth + 1).await? {
                        Reply::Ok(v) => items.push(v),
                        Reply::Err(e) => return Ok(Reply::Err(e)),
                    }
                }
                Reply::Ok(Value::Array(items))
            }
            other => return Err(ReadError::Protocol(format!("unknown reply type {other:?}"))),
        })
    })
}
