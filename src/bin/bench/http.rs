//! The commands' HTTP clients: kept HTTP/1.1 connections to the service, each used by one
//! client at a time (a client takes an idle one, or opens one, and gives it back after its
//! request: never more connections than clients), for one phase, as each reference client
//! holds one PostgreSQL connection.
//!
//! hyper's own connections, not reqwest: the clients run on the same two cores as the
//! service, so whatever a client costs is taken from the service's figure. reqwest parses the
//! URL of every request (IDNA included), builds its headers and checks a connection out of its
//! pool and back; here a request is the method, the path, three headers and the body. The
//! service sees the same requests but for reqwest's `accept: */*`. A connection is opened on a
//! client's first request, inside the timed loop (a round trip on this machine, once per
//! client and phase).

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::http::HeaderValue;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Connections to one service, each taken by one client for one request at a time.
pub struct Connections {
    addr: SocketAddr,
    host: HeaderValue,
    authorization: HeaderValue,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Connections {
    /// For `base` (`http://127.0.0.1:<port>`), every request with `api_key` as its bearer key.
    pub fn new(base: &str, api_key: &str) -> Result<Self> {
        let authority = base
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("{base}: not an http:// address"))?;
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("{base}: not an address and port"))?;
        Ok(Self {
            addr,
            host: HeaderValue::from_str(authority)?,
            authorization: HeaderValue::from_str(&format!("Bearer {api_key}"))?,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// `POST path` with a JSON body on an idle connection (a new one if none is idle); the
    /// status and the whole answer. A connection that failed is not used again.
    pub async fn post_json(&self, path: &str, body: Vec<u8>) -> Result<(StatusCode, Bytes)> {
        let taken = self.lock()?.pop();
        let mut sender = match taken {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.connect().await?,
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)))?;
        sender.ready().await.context("connection to the service")?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let answer = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("POST {path}: body"))?
            .to_bytes();
        self.lock()?.push(sender);
        Ok((status, answer))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        // Ends when the sender is dropped or the service closes the connection; an error
        // also fails the request that was on it.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                eprintln!("bench: an HTTP connection to the service failed: {error}");
            }
        });
        Ok(sender)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<SendRequest<Full<Bytes>>>>> {
        self.idle.lock().map_err(|_| anyhow!("a client panicked"))
    }
}
