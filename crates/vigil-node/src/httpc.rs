//! The load generator's HTTP/1.1 client for pre-trade checks: persistent connections, one request in flight on
//! each, the request written in one `write` and the answer read by its `Content-Length`.
//!
//! `vigil load` measures the node, so what it spends itself is noise on a machine it shares with the node: through
//! `reqwest` (its pool, header maps, URL parsing, a task per connection) a check cost the generator as much CPU
//! as it cost the node (about 65 µs each, docs/performance.md). This client does only what the checks need,
//! against the node's own server (every answer it sends has a `Content-Length`); anything else is an error, which
//! the run counts. It is not a general HTTP client.

use std::sync::Mutex;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest answer head read (status line and headers).
const HEAD_MAX: usize = 16 * 1024;

/// Connections to one server, reused across requests.
pub struct Pool {
    addr: String,
    authorization: Option<String>,
    idle: Mutex<Vec<Conn>>,
}

struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    input: Vec<u8>,
}

/// An answer: its status code and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Pool {
    /// A pool for the server at `addr` (`host:port`), sending `Authorization: Bearer {token}` when given one.
    pub fn new(addr: &str, token: Option<&str>) -> Self {
        Self {
            addr: addr.to_owned(),
            authorization: token.map(|t| format!("Bearer {t}")),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// `POST path` with a JSON body. On a reused connection that the server has closed meanwhile, the request
    /// is sent once more on a new one (a check changes nothing, so sending it twice is harmless).
    pub async fn post(&self, path: &str, body: &str) -> anyhow::Result<Answer> {
        let reused = crate::lock(&self.idle, "the connection pool").pop();
        let fresh = reused.is_none();
        let mut conn = match reused {
            Some(c) => c,
            None => Conn::connect(&self.addr).await?,
        };
        let (answer, reusable) = match conn.exchange(&self.addr, self.authorization.as_deref(), path, body).await {
            Ok(a) => a,
            Err(_) if !fresh => {
                conn = Conn::connect(&self.addr).await?;
                conn.exchange(&self.addr, self.authorization.as_deref(), path, body).await?
            }
            Err(e) => return Err(e),
        };
        if reusable {
            crate::lock(&self.idle, "the connection pool").push(conn);
        }
        Ok(answer)
    }
}

impl Conn {
    async fn connect(addr: &str) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, out: Vec::with_capacity(512), input: Vec::with_capacity(4096) })
    }

    /// Sends one request and reads its answer; the flag says whether the connection may be reused.
    async fn exchange(
        &mut self,
        host: &str,
        authorization: Option<&str>,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(Answer, bool)> {
        self.out.clear();
        self.out.extend_from_slice(b"POST ");
        self.out.extend_from_slice(path.as_bytes());
        self.out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        self.out.extend_from_slice(host.as_bytes());
        if let Some(a) = authorization {
            self.out.extend_from_slice(b"\r\nauthorization: ");
            self.out.extend_from_slice(a.as_bytes());
        }
        self.out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        self.out.extend_from_slice(body.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(body.as_bytes());
        self.stream.write_all(&self.out).await?;

        self.input.clear();
        let head_end = loop {
            if let Some(i) = self.input.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.input.len() > HEAD_MAX {
                bail!("an answer head longer than {HEAD_MAX} bytes");
            }
            self.read_more().await?;
        };
        let (status, length, keep) = parse_head(&self.input[..head_end])?;
        while self.input.len() < head_end + length {
            self.read_more().await?;
        }
        if self.input.len() > head_end + length {
            bail!("{} bytes after the answer's body, which nothing asked for", self.input.len() - head_end - length);
        }
        Ok((Answer { status, body: self.input[head_end..].to_vec() }, keep))
    }

    async fn read_more(&mut self) -> anyhow::Result<()> {
        self.input.reserve(4096);
        if self.stream.read_buf(&mut self.input).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }
}

/// The status, the body's length and whether the connection stays open, from an answer's head.
fn parse_head(head: &[u8]) -> anyhow::Result<(u16, usize, bool)> {
    let head = std::str::from_utf8(head).context("an answer head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .with_context(|| format!("not an HTTP/1.1 status line: {status_line:?}"))?;
    let (mut length, mut keep) = (None, true);
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { bail!("a header line without a colon: {line:?}") };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().with_context(|| format!("content-length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("a {value} answer: this client reads answers with a content-length only");
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep = false;
        }
    }
    Ok((status, length.context("an answer without content-length")?, keep))
}

#[cfg(test)]
mod tests {
    use super::parse_head;

    #[test]
    fn answer_heads_are_read_or_refused() {
        let (status, len, keep) =
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 42\r\n\r\n").expect("ok");
        assert_eq!((status, len, keep), (200, 42, true));
        let (status, len, keep) =
            parse_head(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").expect("ok");
        assert_eq!((status, len, keep), (400, 0, false));
        for bad in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\ncontent-length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
