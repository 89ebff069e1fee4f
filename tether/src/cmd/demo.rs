//! The demo that `tether up` runs for app `demo` (off with `--no-demo`):
//!
//! - a chat business service on `tether.demo.biz.up` (PROTOCOL.md section 11, through the
//!   `tether-business` SDK), so that every UP gets its receipt and an answer: JSON chat
//!   messages of the web page go to everyone in the room, anything else (a line typed into
//!   `tether client`) is echoed to the sender as `echo: …`;
//! - the web chat page of `examples/web-chat/` and the built TypeScript SDK
//!   (`sdk/ts/dist/`), served on base port + 40, with two helpers for the page:
//!   `GET /demo/credential?uid=U&did=D`, which signs a client credential for any name
//!   (**demo only**: a real app's backend signs credentials for users it authenticated),
//!   and `GET /v1/endpoints`, passed through to ipconfig so that the page reaches it from
//!   its own origin (ipconfig sends no CORS headers).
//!
//! The chat protocol (UP and DOWN bodies) is documented in `examples/web-chat/README.md`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tether_business::{Business, ErrorCode, Presence, Push, Stored, Uplink};
use tether_ipconfig::{AppAdmin, CredentialClaims, sign_hs256};
use tether_service::Shutdown;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// The app the demo serves (the one `tether up` adds to the apps bucket).
const DEMO_APP: &str = "demo";
/// Queue group of the demo service on `tether.<app>.biz.up`.
const QUEUE_GROUP: &str = "tether-biz";
/// Chat messages kept per room (sent to a device when it joins the room).
const HISTORY: usize = 50;
/// (did, msg_id) pairs remembered for de-duplication.
const SEEN: usize = 100_000;
/// Longest chat text accepted, in bytes.
const MAX_TEXT: usize = 2_000;
/// Lifetime of the credentials `GET /demo/credential` signs.
const CREDENTIAL_TTL_SECS: u64 = 3_600;

/// Flags of `tether up` for the demo.
#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Do not run the demo business service and web chat page for app `demo`.
    #[arg(long)]
    no_demo: bool,
    /// Folder holding `examples/web-chat/` and `sdk/ts/dist/` (default: the current
    /// directory if it has them, else the repository this binary was built from).
    #[arg(long)]
    web_root: Option<PathBuf>,
}

/// The running demo.
pub struct Demo {
    /// Where the web chat page is served.
    pub addr: SocketAddr,
    web_root: PathBuf,
    tasks: Vec<JoinHandle<()>>,
}

impl Demo {
    /// The banner line(s) of `tether up`.
    pub fn banner(&self) -> String {
        let mut line = format!(
            "  demo chat       http://{}/   (business service for app demo; page from {})\n",
            self.addr,
            self.web_root.display()
        );
        if !self.web_root.join("sdk/ts/dist/tether.min.js").is_file() {
            line += "                  (build the SDK first: make sdk, i.e. npm ci && npm run build in sdk/ts)\n";
        }
        line
    }

    /// Waits for the demo's tasks to end (after the shutdown signal).
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

impl DemoArgs {
    /// Starts the demo for app `demo` unless `--no-demo`: the business service on
    /// `nats_url` and the page server on `listen` (passing `/v1/endpoints` to ipconfig at
    /// `ipconfig`).
    pub async fn start(
        &self,
        nats_url: &str,
        listen: SocketAddr,
        ipconfig: SocketAddr,
        stop: Shutdown,
    ) -> anyhow::Result<Option<Demo>> {
        start(self, nats_url, DEMO_APP, listen, ipconfig, stop).await
    }
}

async fn start(
    args: &DemoArgs,
    nats_url: &str,
    app: &str,
    listen: SocketAddr,
    ipconfig: SocketAddr,
    stop: Shutdown,
) -> anyhow::Result<Option<Demo>> {
    if args.no_demo {
        return Ok(None);
    }
    let client = tether_nats::connect(nats_url, "tether-demo")
        .await
        .context("demo: cannot connect to nats")?;
    let business = Business::new(client.clone(), app);
    let chat = Arc::new(Chat {
        business: business.clone(),
        state: Mutex::new(ChatState::default()),
    });
    let mut tasks = Vec::new();

    let presence = business
        .presence()
        .await
        .context("demo: cannot subscribe to presence")?;
    let (watcher, stopped) = (chat.clone(), stop.clone());
    tasks.push(tokio::spawn(async move {
        let mut presence = presence;
        loop {
            tokio::select! {
                _ = stopped.cancelled() => break,
                event = presence.next() => match event {
                    Some(event) => watcher.on_presence(event).await,
                    None => break,
                },
            }
        }
    }));

    let (server, stopped) = (chat.clone(), stop.clone());
    tasks.push(tokio::spawn(async move {
        let serving = server.business.serve_uplinks(QUEUE_GROUP, {
            let chat = server.clone();
            move |up| {
                let chat = chat.clone();
                async move { chat.on_uplink(up).await }
            }
        });
        tokio::select! {
            _ = stopped.cancelled() => {}
            result = serving => if let Err(error) = result {
                warn!(%error, "demo business service stopped");
            },
        }
    }));

    let web_root = resolve_web_root(args.web_root.as_deref());
    let web_root = std::fs::canonicalize(&web_root).unwrap_or(web_root);
    let admin = AppAdmin::open(client)
        .await
        .context("demo: cannot open the apps bucket")?;
    let web = WebState {
        root: web_root.clone(),
        app: app.to_owned(),
        admin: Arc::new(admin),
        ipconfig,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("demo: cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/", get(index))
        .route("/demo/credential", get(credential))
        .route("/v1/endpoints", get(endpoints))
        .route("/sdk/{file}", get(sdk_file))
        .route("/{file}", get(page_file))
        .with_state(Arc::new(web));
    let stopped = stop.clone();
    tasks.push(tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await;
        if let Err(error) = served {
            warn!(%error, "demo page server failed");
        }
    }));
    info!(%addr, app, root = %web_root.display(), "demo chat service and page running");
    Ok(Some(Demo {
        addr,
        web_root,
        tasks,
    }))
}

/// The folder with `examples/web-chat/` and `sdk/ts/`.
fn resolve_web_root(flag: Option<&Path>) -> PathBuf {
    if let Some(root) = flag {
        return root.to_path_buf();
    }
    let has_page = |root: &Path| root.join("examples/web-chat/index.html").is_file();
    let cwd = PathBuf::from(".");
    if has_page(&cwd) {
        return cwd;
    }
    match Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        Some(repo) if has_page(repo) => repo.to_path_buf(),
        _ => cwd,
    }
}

/// What a page (or any device) sends up, as JSON.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ChatUp {
    /// Join the UP's session (room); answered with the room's history (first join of a
    /// device) and the room's presence list.
    Join,
    /// Leave the UP's room.
    Leave,
    /// A chat message for everyone in the UP's room.
    Chat { text: String },
}

/// One room.
#[derive(Default)]
struct Room {
    /// Member devices → their user ids.
    members: BTreeMap<String, String>,
    /// The newest chat messages.
    history: VecDeque<Value>,
}

#[derive(Default)]
struct ChatState {
    /// (did, msg_id) → the id given to that UP, for de-duplication (state retries).
    seen: HashMap<(String, u64), String>,
    seen_order: VecDeque<(String, u64)>,
    next_id: u64,
    rooms: HashMap<String, Room>,
    /// Devices online according to presence events (and to their own UPs).
    online: HashSet<String>,
}

impl ChatState {
    fn remember(&mut self, did: &str, msg_id: u64) -> String {
        self.next_id += 1;
        let id = format!("m{}", self.next_id);
        let key = (did.to_owned(), msg_id);
        self.seen.insert(key.clone(), id.clone());
        self.seen_order.push_back(key);
        while self.seen_order.len() > SEEN {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        id
    }

    /// The users of `room` with at least one online device, sorted.
    fn online_users(&self, room: &str) -> Vec<String> {
        let mut users: Vec<String> = self
            .rooms
            .get(room)
            .map(|r| {
                r.members
                    .iter()
                    .filter(|(did, _)| self.online.contains(*did))
                    .map(|(_, uid)| uid.clone())
                    .collect()
            })
            .unwrap_or_default();
        users.sort();
        users.dedup();
        users
    }
}

/// The demo chat service.
struct Chat {
    business: Business,
    /// One lock for everything: handling is serialized, so a room's ids, history and
    /// pushes are in one order.
    state: Mutex<ChatState>,
}

impl Chat {
    async fn on_uplink(&self, up: Uplink) -> Stored {
        let mut state = self.state.lock().await;
        if let Some(id) = state.seen.get(&(up.did.clone(), up.msg_id)) {
            return Stored::stored(Some(id.clone()));
        }
        state.online.insert(up.did.clone());
        let parsed = serde_json::from_slice::<ChatUp>(&up.body).ok();
        match (parsed, up.session.clone()) {
            (Some(ChatUp::Join), Some(room)) => {
                let entry = state.rooms.entry(room.clone()).or_default();
                let first_join = entry
                    .members
                    .insert(up.did.clone(), up.uid.clone())
                    .is_none();
                let history: Vec<Value> = entry.history.iter().cloned().collect();
                let id = state.remember(&up.did, up.msg_id);
                if first_join && !history.is_empty() {
                    let body = json!({"type": "history", "room": room, "messages": history});
                    self.push(Push::to_dids([up.did.clone()], body.to_string()).session(&room))
                        .await;
                }
                self.push_presence(&state, &room).await;
                Stored::stored(Some(id))
            }
            (Some(ChatUp::Leave), Some(room)) => {
                if let Some(entry) = state.rooms.get_mut(&room) {
                    entry.members.remove(&up.did);
                }
                let id = state.remember(&up.did, up.msg_id);
                self.push_presence(&state, &room).await;
                Stored::stored(Some(id))
            }
            (Some(ChatUp::Chat { text }), Some(room)) => {
                if text.trim().is_empty() || text.len() > MAX_TEXT {
                    return Stored::error(
                        ErrorCode::Rejected,
                        format!("text must be 1 to {MAX_TEXT} bytes"),
                    );
                }
                let entry = state.rooms.entry(room.clone()).or_default();
                entry.members.insert(up.did.clone(), up.uid.clone());
                let dids: Vec<String> = entry.members.keys().cloned().collect();
                let id = format!("m{}", state.next_id + 1);
                let message = json!({
                    "type": "chat", "room": room, "id": id, "from": up.uid,
                    "text": text, "at": now_ms(),
                });
                let push = Push::to_dids(dids, message.to_string())
                    .session(&room)
                    .meta("kind", "chat");
                if let Err(error) = self.business.push(push).await {
                    warn!(%error, %room, "demo chat push failed");
                    return Stored::error(ErrorCode::Unavailable, "could not deliver; retry");
                }
                let entry = state.rooms.entry(room).or_default();
                entry.history.push_back(message);
                while entry.history.len() > HISTORY {
                    entry.history.pop_front();
                }
                Stored::stored(Some(state.remember(&up.did, up.msg_id)))
            }
            _ => {
                // Not a chat message of the page (e.g. a line from `tether client`): echo it.
                let id = state.remember(&up.did, up.msg_id);
                let mut body = b"echo: ".to_vec();
                body.extend_from_slice(&up.body);
                let mut push = Push::to_dids([up.did.clone()], body).meta("kind", "echo");
                if let Some(session) = up.session {
                    push = push.session(session);
                }
                self.push(push).await;
                Stored::stored(Some(id))
            }
        }
    }

    async fn on_presence(&self, event: Presence) {
        let mut state = self.state.lock().await;
        let changed = if event.online {
            state.online.insert(event.did.clone())
        } else {
            state.online.remove(&event.did)
        };
        if !changed {
            return;
        }
        let rooms: Vec<String> = state
            .rooms
            .iter()
            .filter(|(_, room)| room.members.contains_key(&event.did))
            .map(|(name, _)| name.clone())
            .collect();
        for room in rooms {
            self.push_presence(&state, &room).await;
        }
    }

    /// Tells every member of `room` who is online (QoS0: live state, resent on each join).
    async fn push_presence(&self, state: &ChatState, room: &str) {
        let Some(entry) = state.rooms.get(room) else {
            return;
        };
        let dids: Vec<String> = entry.members.keys().cloned().collect();
        if dids.is_empty() {
            return;
        }
        let body = json!({"type": "presence", "room": room, "online": state.online_users(room)});
        self.push(
            Push::to_dids(dids, body.to_string())
                .qos0()
                .session(room)
                .meta("kind", "presence"),
        )
        .await;
    }

    async fn push(&self, push: Push) {
        if let Err(error) = self.business.push(push).await {
            warn!(%error, "demo push failed");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the page server needs.
struct WebState {
    root: PathBuf,
    app: String,
    admin: Arc<AppAdmin>,
    ipconfig: SocketAddr,
}

type Web = State<Arc<WebState>>;

async fn index(State(web): Web) -> Response {
    serve_file(&web.root.join("examples/web-chat"), "index.html").await
}

async fn page_file(State(web): Web, UrlPath(file): UrlPath<String>) -> Response {
    serve_file(&web.root.join("examples/web-chat"), &file).await
}

async fn sdk_file(State(web): Web, UrlPath(file): UrlPath<String>) -> Response {
    let dir = web.root.join("sdk/ts/dist");
    if !dir.is_dir() {
        return (
            StatusCode::NOT_FOUND,
            "the SDK is not built: run `make sdk` (npm ci && npm run build in sdk/ts)\n",
        )
            .into_response();
    }
    serve_file(&dir, &file).await
}

/// Serves `dir/name` for a plain file name (no path, no leading dot).
async fn serve_file(dir: &Path, name: &str) -> Response {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !plain {
        return StatusCode::NOT_FOUND.into_response();
    }
    let content_type = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") | Some("map") => "application/json",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ts") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    match tokio::fs::read(dir.join(name)).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(Deserialize)]
struct CredentialQuery {
    uid: String,
    did: String,
}

/// `GET /demo/credential?uid=U&did=D`: a client credential for app demo, signed with the
/// app's newest secret. Demo only: anyone may ask for any name.
async fn credential(
    State(web): Web,
    query: Result<Query<CredentialQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error(ErrorCode::BadRequest, "uid and did are required");
    };
    if !tether_auth::valid_id(&query.uid) || !tether_auth::valid_id(&query.did) {
        return error(
            ErrorCode::BadRequest,
            "uid and did must be 1-64 characters of [A-Za-z0-9_-]",
        );
    }
    let record = match web.admin.get(&web.app).await {
        Ok(record) => record,
        Err(e) => return error(ErrorCode::Unavailable, &format!("app {}: {e}", web.app)),
    };
    let Some(secret) = record.secrets.first() else {
        return error(ErrorCode::Internal, "the demo app has no HS256 secret");
    };
    let now = tether_auth::unix_now();
    let claims = CredentialClaims {
        app: web.app.clone(),
        uid: query.uid.clone(),
        did: query.did.clone(),
        exp: now + CREDENTIAL_TTL_SECS,
        iat: Some(now),
    };
    match sign_hs256(secret, &claims) {
        Ok(credential) => axum::Json(json!({
            "app": web.app, "uid": query.uid, "did": query.did,
            "credential": credential, "exp": claims.exp,
        }))
        .into_response(),
        Err(e) => error(ErrorCode::Internal, &e.to_string()),
    }
}

/// `GET /v1/endpoints`, passed through to ipconfig (same origin for the page).
async fn endpoints(State(web): Web, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    let path = match query {
        Some(q) => format!("/v1/endpoints?{q}"),
        None => "/v1/endpoints".to_owned(),
    };
    match forward(web.ipconfig, &path, headers.get(header::AUTHORIZATION)).await {
        Ok(response) => response,
        Err(e) => error(ErrorCode::Unavailable, &format!("ipconfig: {e:#}")),
    }
}

async fn forward(
    to: SocketAddr,
    path: &str,
    authorization: Option<&HeaderValue>,
) -> anyhow::Result<Response> {
    use http_body_util::{BodyExt, Empty, Limited};
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
        .await
        .context("connect timeout")??;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::get(path).header(header::HOST, to.to_string());
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(request.body(Empty::<Bytes>::new())?),
    )
    .await
    .context("answer timeout")??;
    let status = response.status();
    let mut out = HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
    ] {
        if let Some(value) = response.headers().get(&name) {
            out.insert(name, value.clone());
        }
    }
    let body = Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, out, body).into_response())
}

/// A JSON error answer in the shape of PROTOCOL.md section 12.
fn error(code: ErrorCode, message: &str) -> Response {
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        axum::Json(json!({"error": {"code": code.as_str(), "message": message}})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_users_are_members_with_an_online_device_once_each() {
        let mut state = ChatState::default();
        let room = state.rooms.entry("lobby".into()).or_default();
        room.members.insert("alice-1".into(), "alice".into());
        room.members.insert("alice-2".into(), "alice".into());
        room.members.insert("bob-1".into(), "bob".into());
        room.members.insert("carol-1".into(), "carol".into());
        state
            .online
            .extend(["alice-1".into(), "alice-2".into(), "carol-1".into()]);
        assert_eq!(state.online_users("lobby"), ["alice", "carol"]);
        assert!(state.online_users("nowhere").is_empty());
    }

    #[test]
    fn remembered_ids_are_new_per_uplink_and_bounded() {
        let mut state = ChatState::default();
        assert_eq!(state.remember("d", 1), "m1");
        assert_eq!(state.remember("d", 2), "m2");
        assert_eq!(
            state.seen.get(&("d".to_owned(), 1)).map(String::as_str),
            Some("m1")
        );
        for n in 0..SEEN as u64 {
            state.remember("e", n);
        }
        assert_eq!(state.seen.len(), SEEN);
        assert!(!state.seen.contains_key(&("d".to_owned(), 1)));
    }

    #[test]
    fn chat_uplinks_parse_by_type() {
        assert!(matches!(
            serde_json::from_slice::<ChatUp>(br#"{"type":"join"}"#),
            Ok(ChatUp::Join)
        ));
        assert!(matches!(
            serde_json::from_slice::<ChatUp>(br#"{"type":"chat","text":"hi"}"#),
            Ok(ChatUp::Chat { text }) if text == "hi"
        ));
        assert!(serde_json::from_slice::<ChatUp>(b"hello tether").is_err());
        assert!(serde_json::from_slice::<ChatUp>(br#"{"to_uid":"bob"}"#).is_err());
    }

    #[tokio::test]
    async fn only_plain_file_names_are_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("app.js"), "x").expect("write");
        assert_eq!(
            serve_file(dir.path(), "app.js").await.status(),
            StatusCode::OK
        );
        for name in ["", ".env", "../app.js", "a/b.js", "missing.js"] {
            assert_eq!(
                serve_file(dir.path(), name).await.status(),
                StatusCode::NOT_FOUND,
                "{name}"
            );
        }
    }
}
