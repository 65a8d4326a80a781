//! A Lambda Runtime API emulator: runs a function's real binary (the one
//! `cargo lambda` packages) as a child process and hands it invocations
//! through the same HTTP API Lambda's execution environment serves.
//!
//! One [`Function`] is one execution environment: one invocation at a time,
//! as Lambda runs them. A process that dies or is killed mid-invocation
//! fails that invocation, and the next one starts a new process, as Lambda
//! starts a new execution environment. Each process gets its own runtime API
//! server on a fresh loopback port, so nothing a dead process left behind
//! (a pending `/next`, a late response) can reach its successor.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use crate::http::{self, Body};

/// The Runtime API's version prefix.
const PREFIX: &str = "/2018-06-01/runtime";
/// What the function's process may see of ours: the AWS SDK's settings
/// (region, dummy credentials, the emulators' endpoints) and a few
/// process basics. Everything else is the function's own configuration.
const PASSED_VARS: &[&str] = &["PATH", "HOME", "RUST_LOG", "RUST_BACKTRACE", "TZ"];
const ACCOUNT: &str = "123456789012";

/// How to run one function.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The function's name (the template's logical ID).
    pub name: String,
    /// Its binary: `bootstrap` as deployed, here the cargo build output.
    pub binary: PathBuf,
    /// Its environment, beyond the Lambda variables the emulator sets.
    pub env: Vec<(String, String)>,
    /// The function timeout.
    pub timeout: Duration,
    /// Where its stdout and stderr go (appended); discarded when `None`.
    pub log: Option<PathBuf>,
}

/// Why an invocation has no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FunctionError {
    /// The handler returned an error (`/invocation/{id}/error`).
    #[error("{function}: {error_type}: {message}")]
    Handled {
        function: String,
        error_type: String,
        message: String,
    },
    /// The process exited before answering (crashed, killed, or failed its
    /// init).
    #[error("{function}: the process exited during the invocation ({status}){}", init_error.as_deref().map(|e| format!("; init error: {e}")).unwrap_or_default())]
    Exited {
        function: String,
        status: String,
        killed: bool,
        init_error: Option<String>,
    },
    /// No answer within the function's timeout; the process was stopped.
    #[error("{function}: timed out after {timeout:?}")]
    Timeout { function: String, timeout: Duration },
    /// The process could not be started.
    #[error("{function}: cannot start {binary}: {reason}")]
    Start {
        function: String,
        binary: String,
        reason: String,
    },
    /// The response body is not JSON.
    #[error("{function}: the response is not JSON: {reason}")]
    BadResponse { function: String, reason: String },
}

/// What a function did during the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FunctionStats {
    pub invocations: u64,
    /// Invocations answered with a response.
    pub responses: u64,
    /// Handler errors, exits, timeouts.
    pub errors: u64,
    /// Processes started (the first one and every restart).
    pub starts: u64,
    /// Processes killed on purpose mid-invocation.
    pub kills: u64,
    /// Processes that exited on their own mid-invocation.
    pub crashes: u64,
    pub timeouts: u64,
    /// From process start to its first `/next`, in milliseconds, per start.
    pub init_ms: Vec<u64>,
}

/// One invocation on its way to the function.
#[derive(Debug)]
struct Invocation {
    id: String,
    payload: Vec<u8>,
    deadline_ms: u64,
    reply: oneshot::Sender<Result<Value, FunctionError>>,
    handed: oneshot::Sender<()>,
}

/// The invocation the function is working on.
#[derive(Debug)]
struct InFlight {
    id: String,
    reply: oneshot::Sender<Result<Value, FunctionError>>,
}

/// What one execution environment's runtime API server shares with its
/// handlers.
#[derive(Debug)]
struct EnvShared {
    function: String,
    arn: String,
    next: Mutex<mpsc::Receiver<Invocation>>,
    current: StdMutex<Option<InFlight>>,
    started: Instant,
    initialised: StdMutex<bool>,
    init_error: StdMutex<Option<String>>,
    stats: Arc<StdMutex<FunctionStats>>,
}

/// One running process and its server.
#[derive(Debug)]
struct Env {
    shared: Arc<EnvShared>,
    child: Child,
    server: JoinHandle<()>,
    invocations: mpsc::Sender<Invocation>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server.abort();
        let _ = self.child.start_kill();
    }
}

/// When to kill the process on purpose: during the first invocation
/// numbered `from` or later that is still running `after` it was handed
/// out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillPlan {
    pub from_invocation: u64,
    pub after: Duration,
}

/// One function's execution environment.
#[derive(Debug)]
pub struct Function {
    spec: FunctionSpec,
    env: Mutex<Option<Env>>,
    stats: Arc<StdMutex<FunctionStats>>,
    kills: StdMutex<Vec<KillPlan>>,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not stop the run's bookkeeping.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Function {
    pub fn new(spec: FunctionSpec) -> Self {
        Self {
            spec,
            env: Mutex::new(None),
            stats: Arc::new(StdMutex::new(FunctionStats::default())),
            kills: StdMutex::new(Vec::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Plans a kill (see [`KillPlan`]); each plan fires once.
    pub fn plan_kill(&self, plan: KillPlan) {
        lock(&self.kills).push(plan);
    }

    pub fn stats(&self) -> FunctionStats {
        lock(&self.stats).clone()
    }

    /// Starts the process now rather than at the first invocation, and
    /// waits until it asks for work (its init is done), or `limit` passes.
    pub async fn warm_up(&self, limit: Duration) -> Result<(), FunctionError> {
        let mut guard = self.env.lock().await;
        if guard.is_none() {
            *guard = Some(self.start().await?);
        }
        let until = Instant::now() + limit;
        while Instant::now() < until {
            let Some(env) = guard.as_mut() else {
                break;
            };
            if *lock(&env.shared.initialised) {
                return Ok(());
            }
            if let Ok(Some(status)) = env.child.try_wait() {
                let init_error = lock(&env.shared.init_error).clone();
                *guard = None;
                return Err(FunctionError::Exited {
                    function: self.spec.name.clone(),
                    status: status.to_string(),
                    killed: false,
                    init_error,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Invokes the function synchronously with `payload` and returns its
    /// response.
    pub async fn invoke(&self, payload: &Value) -> Result<Value, FunctionError> {
        let mut guard = self.env.lock().await;
        if guard.is_none() {
            *guard = Some(self.start().await?);
        }
        let Some(env) = guard.as_mut() else {
            return Err(self.start_error("no environment"));
        };
        let number = {
            let mut stats = lock(&self.stats);
            stats.invocations = stats.invocations.saturating_add(1);
            stats.invocations
        };
        let kill_after = lock(&self.kills)
            .iter()
            .find(|k| k.from_invocation <= number)
            .map(|k| k.after);
        let (reply_tx, reply_rx) = oneshot::channel();
        let (handed_tx, handed_rx) = oneshot::channel();
        let invocation = Invocation {
            id: uuid::Uuid::new_v4().to_string(),
            payload: serde_json::to_vec(payload).unwrap_or_default(),
            deadline_ms: now_ms().saturating_add(millis(self.spec.timeout)),
            reply: reply_tx,
            handed: handed_tx,
        };

        enum Ended {
            Reply(Result<Value, FunctionError>),
            Exited(String),
            Timeout,
            Kill,
        }
        let ended = if env.invocations.send(invocation).await.is_err() {
            Ended::Exited("its runtime API server stopped".to_owned())
        } else {
            let kill_timer = async {
                match kill_after {
                    Some(after) if handed_rx.await.is_ok() => tokio::time::sleep(after).await,
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                reply = reply_rx => Ended::Reply(reply.unwrap_or_else(|_| Err(FunctionError::Exited {
                    function: self.spec.name.clone(),
                    status: "its runtime API server stopped".to_owned(),
                    killed: false,
                    init_error: None,
                }))),
                status = env.child.wait() => Ended::Exited(match status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                }),
                _ = tokio::time::sleep(self.spec.timeout) => Ended::Timeout,
                _ = kill_timer => Ended::Kill,
            }
        };

        let result = {
            let mut stats = lock(&self.stats);
            let result = match ended {
                Ended::Reply(Ok(value)) => {
                    stats.responses = stats.responses.saturating_add(1);
                    return Ok(value);
                }
                Ended::Reply(Err(e @ FunctionError::Handled { .. })) => {
                    stats.errors = stats.errors.saturating_add(1);
                    return Err(e);
                }
                Ended::Reply(Err(e)) => e,
                Ended::Exited(status) => {
                    stats.crashes = stats.crashes.saturating_add(1);
                    FunctionError::Exited {
                        function: self.spec.name.clone(),
                        status,
                        killed: false,
                        init_error: lock(&env.shared.init_error).clone(),
                    }
                }
                Ended::Timeout => {
                    stats.timeouts = stats.timeouts.saturating_add(1);
                    FunctionError::Timeout {
                        function: self.spec.name.clone(),
                        timeout: self.spec.timeout,
                    }
                }
                Ended::Kill => {
                    stats.kills = stats.kills.saturating_add(1);
                    let mut kills = lock(&self.kills);
                    if let Some(i) = kills.iter().position(|k| k.from_invocation <= number) {
                        kills.remove(i);
                    }
                    FunctionError::Exited {
                        function: self.spec.name.clone(),
                        status: "killed (SIGKILL)".to_owned(),
                        killed: true,
                        init_error: None,
                    }
                }
            };
            stats.errors = stats.errors.saturating_add(1);
            result
        };
        // Lambda replaces an environment whose process died or timed out.
        if let Some(mut env) = guard.take() {
            let _ = env.child.start_kill();
            let _ = env.child.wait().await;
        }
        Err(result)
    }

    /// Stops the process, if one runs.
    pub async fn stop(&self) {
        if let Some(mut env) = self.env.lock().await.take() {
            let _ = env.child.start_kill();
            let _ = env.child.wait().await;
        }
    }

    fn start_error(&self, reason: impl Into<String>) -> FunctionError {
        FunctionError::Start {
            function: self.spec.name.clone(),
            binary: self.spec.binary.display().to_string(),
            reason: reason.into(),
        }
    }

    async fn start(&self) -> Result<Env, FunctionError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| self.start_error(format!("cannot listen on loopback: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| self.start_error(e.to_string()))?
            .port();
        let (tx, rx) = mpsc::channel(1);
        let shared = Arc::new(EnvShared {
            function: self.spec.name.clone(),
            arn: format!(
                "arn:aws:lambda:{}:{ACCOUNT}:function:{}",
                std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned()),
                self.spec.name
            ),
            next: Mutex::new(rx),
            current: StdMutex::new(None),
            started: Instant::now(),
            initialised: StdMutex::new(false),
            init_error: StdMutex::new(None),
            stats: self.stats.clone(),
        });
        let server = {
            let shared = shared.clone();
            http::serve(listener, move |req| runtime_api(shared.clone(), req))
        };

        let mut command = Command::new(&self.spec.binary);
        command.env_clear();
        for (key, value) in std::env::vars() {
            if key.starts_with("AWS_") || PASSED_VARS.contains(&key.as_str()) {
                command.env(key, value);
            }
        }
        command
            .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}"))
            .env("AWS_LAMBDA_FUNCTION_NAME", &self.spec.name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", self.spec.name),
            )
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                uuid::Uuid::new_v4().to_string(),
            )
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match &self.spec.log {
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| self.start_error(format!("log {}: {e}", path.display())))?;
                let err = file
                    .try_clone()
                    .map_err(|e| self.start_error(e.to_string()))?;
                command.stdout(file).stderr(err);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = command.spawn().map_err(|e| {
            server.abort();
            self.start_error(e.to_string())
        })?;
        {
            let mut stats = lock(&self.stats);
            stats.starts = stats.starts.saturating_add(1);
        }
        Ok(Env {
            shared,
            child,
            server,
            invocations: tx,
        })
    }
}

fn runtime_error(status: StatusCode, error_type: &str, message: &str) -> Response<Body> {
    http::json(
        status,
        &serde_json::json!({"errorType": error_type, "errorMessage": message}),
    )
}

/// The Runtime API, as one execution environment's process sees it.
async fn runtime_api(shared: Arc<EnvShared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return runtime_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
    };
    let method = req.method().clone();
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["invocation", "next"]) => next_invocation(&shared).await,
        (Method::POST, ["invocation", id, "response"]) => {
            let id = (*id).to_owned();
            let body = match http::read_body(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return runtime_error(StatusCode::BAD_REQUEST, "InvalidRequest", &e),
            };
            let result =
                serde_json::from_slice::<Value>(&body).map_err(|e| FunctionError::BadResponse {
                    function: shared.function.clone(),
                    reason: e.to_string(),
                });
            settle(&shared, &id, result)
        }
        (Method::POST, ["invocation", id, "error"]) => {
            let id = (*id).to_owned();
            let header_type = req
                .headers()
                .get("lambda-runtime-function-error-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = http::read_body(req.into_body()).await.unwrap_or_default();
            let (error_type, message) = error_body(&body, header_type);
            settle(
                &shared,
                &id,
                Err(FunctionError::Handled {
                    function: shared.function.clone(),
                    error_type,
                    message,
                }),
            )
        }
        (Method::POST, ["init", "error"]) => {
            let header_type = req
                .headers()
                .get("lambda-runtime-function-error-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = http::read_body(req.into_body()).await.unwrap_or_default();
            let (error_type, message) = error_body(&body, header_type);
            *lock(&shared.init_error) = Some(format!("{error_type}: {message}"));
            http::json(StatusCode::ACCEPTED, &serde_json::json!({"status": "OK"}))
        }
        _ => runtime_error(StatusCode::NOT_FOUND, "NotFound", "unknown path"),
    }
}

fn error_body(body: &[u8], header_type: Option<String>) -> (String, String) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let error_type = field("errorType")
        .or(header_type)
        .unwrap_or_else(|| "Unhandled".to_owned());
    let message =
        field("errorMessage").unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    (error_type, message)
}

async fn next_invocation(shared: &EnvShared) -> Response<Body> {
    {
        let mut initialised = lock(&shared.initialised);
        if !*initialised {
            *initialised = true;
            let mut stats = lock(&shared.stats);
            stats.init_ms.push(millis(shared.started.elapsed()));
        }
    }
    let invocation = shared.next.lock().await.recv().await;
    let Some(invocation) = invocation else {
        return runtime_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the environment is shutting down",
        );
    };
    let mut response = http::respond(StatusCode::OK, "application/json", invocation.payload);
    let headers = response.headers_mut();
    for (name, value) in [
        ("lambda-runtime-aws-request-id", invocation.id.clone()),
        (
            "lambda-runtime-deadline-ms",
            invocation.deadline_ms.to_string(),
        ),
        ("lambda-runtime-invoked-function-arn", shared.arn.clone()),
        (
            "lambda-runtime-trace-id",
            format!(
                "Root=1-{:08x}-{}",
                now_ms() / 1000,
                &invocation.id.replace('-', "")[..24]
            ),
        ),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    *lock(&shared.current) = Some(InFlight {
        id: invocation.id,
        reply: invocation.reply,
    });
    let _ = invocation.handed.send(());
    response
}

fn settle(shared: &EnvShared, id: &str, result: Result<Value, FunctionError>) -> Response<Body> {
    let mut current = lock(&shared.current);
    match current.take() {
        Some(in_flight) if in_flight.id == id => {
            let _ = in_flight.reply.send(result);
            http::json(StatusCode::ACCEPTED, &serde_json::json!({"status": "OK"}))
        }
        other => {
            *current = other;
            runtime_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestID",
                &format!("no invocation {id} is in flight"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A custom runtime in bash and curl, as Lambda's own custom runtime
    /// tutorial writes one: the emulator is tested against a real process
    /// speaking the Runtime API over HTTP.
    const BOOTSTRAP: &str = r#"#!/usr/bin/env bash
set -u
api="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
if [ -n "${FAIL_INIT:-}" ]; then
    curl -sS -X POST "$api/init/error" -d '{"errorType":"InitFailed","errorMessage":"no config"}' >/dev/null
    exit 1
fi
headers="$(mktemp)"
while true; do
    body="$(curl -sS -D "$headers" "$api/invocation/next")" || exit 1
    header() { grep -i "^$1:" "$headers" | cut -d' ' -f2 | tr -d '\r'; }
    id="$(header lambda-runtime-aws-request-id)"
    deadline="$(header lambda-runtime-deadline-ms)"
    arn="$(header lambda-runtime-invoked-function-arn)"
    case "$body" in
        *'"exit"'*) exit 3 ;;
        *'"fail"'*) curl -sS -X POST "$api/invocation/$id/error" -d '{"errorType":"Boom","errorMessage":"asked to fail"}' >/dev/null ;;
        *'"sleep"'*) sleep 3; curl -sS -X POST "$api/invocation/$id/response" -d '{"slept":true}' >/dev/null ;;
        *) curl -sS -X POST "$api/invocation/$id/response" -d "{\"got\":$body,\"function\":\"$AWS_LAMBDA_FUNCTION_NAME\",\"deadline\":$deadline,\"arn\":\"$arn\"}" >/dev/null ;;
    esac
done
"#;

    fn bootstrap() -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("orders-e2e-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bootstrap");
        std::fs::write(&path, BOOTSTRAP).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn function(timeout: Duration, env: &[(&str, &str)]) -> Function {
        Function::new(FunctionSpec {
            name: "EchoFunction".into(),
            binary: bootstrap(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            timeout,
            log: None,
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invokes_a_process_through_the_runtime_api() {
        let f = function(Duration::from_secs(10), &[]);
        let before = now_ms();
        let out = f.invoke(&serde_json::json!({"n": 1})).await.unwrap();
        assert_eq!(out["got"], serde_json::json!({"n": 1}));
        assert_eq!(out["function"], "EchoFunction");
        assert!(out["deadline"].as_u64().unwrap() >= before + 9_000);
        assert!(out["arn"]
            .as_str()
            .unwrap()
            .ends_with(":function:EchoFunction"));
        // The same process serves the next invocation.
        let out = f.invoke(&serde_json::json!({"n": 2})).await.unwrap();
        assert_eq!(out["got"]["n"], 2);
        let stats = f.stats();
        assert_eq!(
            (stats.starts, stats.invocations, stats.responses),
            (1, 2, 2)
        );
        assert_eq!(stats.init_ms.len(), 1);
        f.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handler_errors_keep_the_environment() {
        let f = function(Duration::from_secs(10), &[]);
        match f.invoke(&serde_json::json!({"fail": true})).await {
            Err(FunctionError::Handled {
                error_type,
                message,
                ..
            }) => {
                assert_eq!(
                    (error_type.as_str(), message.as_str()),
                    ("Boom", "asked to fail")
                );
            }
            other => panic!("{other:?}"),
        }
        f.invoke(&serde_json::json!({"n": 3})).await.unwrap();
        assert_eq!(f.stats().starts, 1);
        f.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_that_dies_fails_the_invocation_and_is_replaced() {
        let f = function(Duration::from_secs(10), &[]);
        match f.invoke(&serde_json::json!({"exit": true})).await {
            Err(FunctionError::Exited { killed: false, .. }) => {}
            other => panic!("{other:?}"),
        }
        f.invoke(&serde_json::json!({"n": 4})).await.unwrap();
        let stats = f.stats();
        assert_eq!((stats.starts, stats.crashes), (2, 1));
        assert_eq!(stats.init_ms.len(), 2);
        f.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_planned_kill_hits_a_running_invocation_once() {
        let f = function(Duration::from_secs(10), &[]);
        f.plan_kill(KillPlan {
            from_invocation: 2,
            after: Duration::from_millis(200),
        });
        // Answered before the kill comes: not killed.
        f.invoke(&serde_json::json!({"n": 1})).await.unwrap();
        f.invoke(&serde_json::json!({"n": 2})).await.unwrap();
        match f.invoke(&serde_json::json!({"sleep": true})).await {
            Err(FunctionError::Exited { killed: true, .. }) => {}
            other => panic!("{other:?}"),
        }
        // The plan fired; the new process is left alone.
        f.invoke(&serde_json::json!({"sleep": true})).await.unwrap();
        let stats = f.stats();
        assert_eq!((stats.kills, stats.starts), (1, 2));
        f.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeouts_and_init_errors_are_function_errors() {
        let f = function(Duration::from_millis(500), &[]);
        match f.invoke(&serde_json::json!({"sleep": true})).await {
            Err(FunctionError::Timeout { .. }) => {}
            other => panic!("{other:?}"),
        }
        f.invoke(&serde_json::json!({"n": 5})).await.unwrap();
        assert_eq!(f.stats().timeouts, 1);
        f.stop().await;

        let f = function(Duration::from_secs(5), &[("FAIL_INIT", "1")]);
        match f.warm_up(Duration::from_secs(5)).await {
            Err(FunctionError::Exited {
                init_error: Some(e),
                ..
            }) => {
                assert!(e.contains("InitFailed"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_bodies_read_both_shapes() {
        let (t, m) = error_body(
            br#"{"errorType":"&alloc::Boxed","errorMessage":"bad"}"#,
            Some("unhandled".into()),
        );
        assert_eq!((t.as_str(), m.as_str()), ("&alloc::Boxed", "bad"));
        let (t, m) = error_body(b"plain text", Some("Runtime.InitError".into()));
        assert_eq!(
            (t.as_str(), m.as_str()),
            ("Runtime.InitError", "plain text")
        );
    }
}
