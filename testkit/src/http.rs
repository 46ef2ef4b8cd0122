//! Plain HTTP for tests: a GET, a metric read from a scrape, readiness polled with a deadline,
//! and [`Fake`], a tiny server that answers as told and records what it was sent.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A plain GET: status and body, or `None` when nothing answers.
pub async fn get(url: &str) -> Option<(StatusCode, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = client.get(url.parse().ok()?).await.ok()?;
    let status = r.status();
    let b = r.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&b).into_owned()))
}

/// The value of the sample whose line starts with `series` (name and labels as printed).
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Poll `http://{admin}/readyz` until it answers 200; panics after `within`. `exited` is
/// asked between polls: `Some(why)` (the process under test has gone) panics at once.
pub async fn wait_ready(
    admin: SocketAddr,
    within: Duration,
    mut exited: impl FnMut() -> Option<String>,
) {
    let url = format!("http://{admin}/readyz");
    let deadline = Instant::now() + within;
    while get(&url).await.map(|r| r.0) != Some(StatusCode::OK) {
        if let Some(why) = exited() {
            panic!("the sidecar exited before it was ready: {why}");
        }
        assert!(Instant::now() < deadline, "the sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Poll `metrics_url` until `series` reads `want`; panics after 10 s with the last value.
pub async fn wait_metric(metrics_url: &str, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = get(metrics_url)
            .await
            .and_then(|(_, text)| metric_in(&text, series));
        if v == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {v:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request a [`Fake`] server received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub path: String,
    pub body: Bytes,
}

type Handler = dyn Fn(&Seen, &[Seen]) -> (StatusCode, &'static str, String) + Send + Sync;

/// A tiny HTTP/1 server on 127.0.0.1:0 answering with `handler(request, every request so far)`
/// -> (status, content type, body).
pub struct Fake {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    pub async fn start(
        handler: impl Fn(&Seen, &[Seen]) -> (StatusCode, &'static str, String) + Send + Sync + 'static,
    ) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, handler) = (s.clone(), handler.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (seen, handler) = (seen.clone(), handler.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let this = Seen {
                            method: parts.method,
                            path: parts.uri.path().to_string(),
                            body,
                        };
                        let (status, ctype, text) = {
                            let mut all = seen.lock().unwrap();
                            all.push(this.clone());
                            handler(&this, &all)
                        };
                        let mut r = Response::new(Full::new(Bytes::from(text)));
                        *r.status_mut() = status;
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static(ctype),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}
