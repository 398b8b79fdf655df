//! `weft-signal`: the signaling server. It introduces peers (rooms, membership, addressed
//! forwarding of opaque payloads) and serves the web app. It never sees a network name,
//! a passphrase, or anything peers encrypt.
//!
//! [`app`] builds the router, so tests run the server in-process; [`Server::start`] binds
//! and serves it over HTTP or HTTPS; `main.rs` only parses configuration.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod metrics;
pub mod relay;
mod shared_port;
pub mod tls;
pub mod turn;
mod ws;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

pub use metrics::Metrics;
pub use relay::Limits;
pub use tls::{TlsSetup, TlsSource};
pub use turn::{EmbeddedTurn, IceOffer, TurnConfig, TurnTls};

/// The listen address when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Where `cargo xtask` puts the built web app, relative to the workspace.
pub fn default_web_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web-dist")
}

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Directory with `index.html` and the WASM bundle.
    pub web_root: PathBuf,
    /// HTTPS instead of HTTP.
    pub tls: Option<TlsSource>,
    /// Limits on clients.
    pub limits: Limits,
    /// The embedded STUN/TURN server, and the ICE servers members are handed.
    pub turn: TurnConfig,
    /// Share rooms with other `weft-signal` processes through the NATS server at this URL
    /// (`nats://host:port`, JetStream on); none: this process alone.
    pub cluster: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            web_root: default_web_root(),
            tls: None,
            limits: Limits::default(),
            turn: TurnConfig::default(),
            cluster: None,
        }
    }
}

#[derive(Debug)]
struct Inner {
    hub: Mutex<ws::Hub>,
    metrics: Arc<Metrics>,
    /// ICE servers (with credentials) for each member; none: members get none.
    ice: Option<Arc<IceOffer>>,
    /// The embedded relay, told when a member leaves.
    turn: Mutex<Option<Arc<EmbeddedTurn>>>,
    /// The cluster this process shares rooms with, if any.
    cluster: Option<Arc<cluster::Cluster>>,
    limits: Limits,
    web_root: PathBuf,
    shutdown: watch::Sender<bool>,
}

/// State shared by every request.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    /// Fresh state: no rooms, no connections, no ICE servers to hand out.
    pub fn new(limits: Limits, web_root: PathBuf) -> Self {
        Self::with_ice(limits, web_root, Arc::default(), None)
    }

    /// Fresh state that hands each member the ICE servers of `ice`.
    pub fn with_ice(
        limits: Limits,
        web_root: PathBuf,
        metrics: Arc<Metrics>,
        ice: Option<Arc<IceOffer>>,
    ) -> Self {
        Self::build(limits, web_root, metrics, ice, None)
    }

    fn build(
        limits: Limits,
        web_root: PathBuf,
        metrics: Arc<Metrics>,
        ice: Option<Arc<IceOffer>>,
        cluster: Option<Arc<cluster::Cluster>>,
    ) -> Self {
        let hub = ws::Hub::new(relay::Relay::new(limits.clone()));
        let (shutdown, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                hub: Mutex::new(hub),
                metrics,
                ice,
                turn: Mutex::new(None),
                cluster,
                limits,
                web_root,
                shutdown,
            }),
        }
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Tells every WebSocket connection to close with [`ErrorCode::ShuttingDown`].
    ///
    /// [`ErrorCode::ShuttingDown`]: weft_core::signal::ErrorCode::ShuttingDown
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// Where the web app keeps its content-hashed files (`cargo xtask bundle` puts all but
/// `index.html` under `a/<hash>/`): a name there never changes its bytes, so browsers keep
/// them for a year without asking again. Everything else is `no-cache` (asked again each
/// time; an unchanged file costs a 304).
pub const IMMUTABLE_PREFIX: &str = "/a/";

/// The router: `/ws`, `/healthz`, `/metrics`, and the web app.
pub fn app(state: AppState) -> Router {
    let web_root = state.inner.web_root.clone();
    // `F.br` / `F.gz` beside `F` (made by `cargo xtask bundle`) are sent instead when the
    // browser accepts them.
    let static_files = ServeDir::new(&web_root)
        .precompressed_br()
        .precompressed_gzip()
        .append_index_html_on_directories(true)
        .fallback(get(missing_bundle).with_state(state.clone()));
    Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback_service(static_files)
        .with_state(state)
        .layer(axum::middleware::map_response(cache_control))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; \
                 connect-src 'self' ws: wss:; img-src 'self' data: blob:; \
                 style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            ),
        ))
}

/// `Cache-Control`: immutable for a successful response under [`IMMUTABLE_PREFIX`],
/// `no-cache` for anything else.
async fn cache_control(uri: axum::http::Uri, mut response: Response) -> Response {
    let immutable = uri.path().starts_with(IMMUTABLE_PREFIX) && response.status().is_success();
    let value = if immutable { "public, max-age=31536000, immutable" } else { "no-cache" };
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
    response
}

/// Bytes read from a WebSocket at a time: a typical signaling message fits twice over.
const READ_BUFFER: usize = 8 * 1024;

async fn ws_upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if !origin_allowed(&headers, &state.inner.limits.allowed_origins) {
        tracing::debug!("WebSocket from an origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            "this site may not use this Weft server (--allowed-origin)",
        )
            .into_response();
    }
    let ip = client_ip(peer.ip(), &headers, state.inner.limits.trust_forwarded_for);
    // Frames a little over the limit still arrive whole, so the client learns why it is
    // closed; far larger ones are cut off by the WebSocket layer itself.
    let hard_limit = state.inner.limits.max_message_bytes.saturating_mul(16);
    // tungstenite zero-fills its read buffer up to this size before every read (128 KiB by
    // default): for signaling's small messages that memset was the relay's largest cost.
    ws.read_buffer_size(READ_BUFFER)
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| ws::run_connection(socket, state, ip))
}

/// Whether a WebSocket upgrade may proceed: any origin when `allowed` is empty; else a
/// request without `Origin` (not a browser), one from the server's own host, or one from
/// an origin in `allowed`.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    if allowed.iter().any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin)) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    host.is_some_and(|h| origin_host.is_some_and(|o| o.eq_ignore_ascii_case(h)))
}

/// The client's address for per-address limits: the socket's peer, or, only when the
/// server is told it runs behind a reverse proxy (`--trust-forwarded-for`), the last
/// `X-Forwarded-For` entry (the one that proxy added; earlier ones are the client's word).
fn client_ip(peer: IpAddr, headers: &HeaderMap, trust_forwarded_for: bool) -> IpAddr {
    if !trust_forwarded_for {
        return peer;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|v| v.trim().parse::<IpAddr>().ok())
        .next_back()
        .unwrap_or(peer)
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let m = state.metrics();
    axum::Json(serde_json::json!({
        "status": "ok",
        "connections": m.connections.get(),
        "rooms": m.rooms.get(),
    }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics().render(),
    )
}

async fn missing_bundle(State(state): State<AppState>) -> Response {
    if state.inner.web_root.join("index.html").is_file() {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let root = state.inner.web_root.display().to_string();
    let body = format!(
        "<!doctype html><title>Weft: web app not built</title>\
         <h1>The Weft web app is not built</h1>\
         <p>No <code>index.html</code> in <code>{}</code>. Run <code>cargo xtask run</code> \
         from the Weft checkout, or pass <code>--web-root</code>.</p>",
        html_escape(&root)
    );
    (StatusCode::SERVICE_UNAVAILABLE, Html(body)).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listen address is taken or not ours.
    #[error(
        "cannot listen on {addr}: {source} (is another weft-signal running? choose another with --listen)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The embedded STUN/TURN server could not start.
    #[error(transparent)]
    Turn(#[from] turn::TurnError),
    /// The cluster (`--cluster`) could not be joined.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// TURN over TLS was given a certificate of its own, and the HTTPS port.
    #[error(
        "TURN over TLS on the HTTPS port uses the HTTPS certificate: drop --turn-tls-cert, or give TURN over TLS a port of its own with --turn-tls-port"
    )]
    TurnTlsCertificateOnHttpsPort,
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    tls: Option<TlsSetup>,
    state: AppState,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    turn: Option<Arc<EmbeddedTurn>>,
}

impl Server {
    /// Binds `config.listen` and starts serving in the background, with the embedded
    /// STUN/TURN server unless it is off.
    pub async fn start(config: Config) -> Result<Self, ServerError> {
        let tls = config.tls.as_ref().map(|t| t.load(config.listen)).transpose()?;
        let bind = |source| ServerError::Bind { addr: config.listen, source };
        let listener = std::net::TcpListener::bind(config.listen).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let metrics = Arc::new(Metrics::default());
        let secret = match &config.turn.secret {
            Some(s) => s.as_bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let (turn, ice) = if config.turn.enabled {
            // TURN over TLS uses its own certificate if it has one, else the HTTPS one; on
            // the HTTPS port, the HTTPS server sorts TURN clients from web ones.
            let own = match &config.turn.tls_certificate {
                Some(source) if config.turn.tls => Some(source.load(config.listen)?),
                _ => None,
            };
            let on_https_port = config.turn.tls_port != 0 && config.turn.tls_port == addr.port();
            let turn_tls = match (&own, &tls) {
                _ if !config.turn.tls => TurnTls::Off,
                (Some(_), _) if on_https_port => {
                    return Err(ServerError::TurnTlsCertificateOnHttpsPort);
                }
                (Some(setup), _) => TurnTls::OwnPort(setup),
                (None, Some(setup)) if on_https_port => TurnTls::HttpsPort { https: addr, setup },
                (None, Some(setup)) => TurnTls::OwnPort(setup),
                (None, None) => TurnTls::Off,
            };
            let (turn, offer) =
                EmbeddedTurn::start(&config.turn, addr.ip(), turn_tls, &secret, metrics.clone())
                    .await?;
            (Some(Arc::new(turn)), Some(offer))
        } else if config.turn.external_urls.is_empty() {
            (None, None)
        } else {
            let urls = config.turn.external_urls.clone();
            (None, Some(Arc::new(IceOffer::new(&secret, config.turn.credential_ttl, urls))))
        };
        let cluster = match &config.cluster {
            Some(url) => Some(Arc::new(cluster::Cluster::connect(url).await?)),
            None => None,
        };
        let state = AppState::build(config.limits, config.web_root, metrics.clone(), ice, cluster);
        state.run_cluster().await?;
        *state.inner.turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = turn.clone();
        let service = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let handle = axum_server::Handle::new();
        let turn_handoff = turn.as_ref().and_then(|t| t.tls_handoff());
        let task = match (&tls, turn_handoff) {
            (Some(setup), Some(handoff)) => {
                let timeout = config.turn.tls_handshake_timeout;
                let https = setup.config.get_inner();
                let acceptor = shared_port::HttpsOrTurn::new(&https, timeout, handoff, metrics);
                let server = axum_server::from_tcp(listener)
                    .map_err(bind)?
                    .acceptor(acceptor)
                    .handle(handle.clone());
                tokio::spawn(server.serve(service))
            }
            (Some(setup), None) => {
                let server = axum_server::from_tcp_rustls(listener, setup.config.clone())
                    .map_err(bind)?
                    .handle(handle.clone());
                tokio::spawn(server.serve(service))
            }
            (None, _) => {
                let server = axum_server::from_tcp(listener).map_err(bind)?.handle(handle.clone());
                tokio::spawn(server.serve(service))
            }
        };
        tracing::info!(%addr, tls = tls.is_some(), "listening");
        Ok(Self { addr, tls, state, handle, task, turn })
    }

    /// The embedded STUN/TURN server, if it runs.
    pub fn turn(&self) -> Option<&EmbeddedTurn> {
        self.turn.as_deref()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS certificate in use, if serving HTTPS.
    pub fn tls(&self) -> Option<&TlsSetup> {
        self.tls.as_ref()
    }

    /// The page to open, e.g. `http://127.0.0.1:8080/`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let host = if self.addr.ip().is_unspecified() {
            "localhost".to_string()
        } else if self.addr.is_ipv6() {
            format!("[{}]", self.addr.ip())
        } else {
            self.addr.ip().to_string()
        };
        format!("{scheme}://{host}:{}/", self.addr.port())
    }

    /// The WebSocket endpoint, e.g. `ws://127.0.0.1:8080/ws`.
    pub fn ws_url(&self) -> String {
        let url = self.url();
        let url = url.replacen("http", "ws", 1);
        format!("{url}ws")
    }

    /// Shared state, for metrics.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Closes every WebSocket with a reason, finishes requests in flight (at most
    /// `grace`), and stops.
    pub async fn shutdown(mut self, grace: Duration) {
        self.state.begin_shutdown();
        // Let connection tasks send their close frames before connections are cut.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.handle.graceful_shutdown(Some(grace));
        if let Some(turn) = &self.turn {
            turn.close().await;
        }
        let stopped = (&mut self.task).await;
        if let Some(cluster) = &self.state.inner.cluster {
            cluster.release_lease().await;
        }
        match stopped {
            Ok(Ok(())) => tracing::info!("stopped"),
            Ok(Err(e)) => tracing::warn!("server stopped with an error: {e}"),
            Err(e) => tracing::warn!("server task failed: {e}"),
        }
    }

    /// Waits until the server stops on its own (it only does on an I/O error).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        (&mut self.task).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}
