//! Secrets never print: store and target URLs carrying a password are
//! driven through each command's failure paths (argument checking,
//! malformed URLs, servers that refuse, bad credentials), as arguments and
//! from the environment, with every log level on; the password appears
//! nowhere in what the command prints.

use std::process::{Command, Output};

/// A password no output could contain by chance, in a form a URL carries
/// as is and in a percent-encoded form.
const SECRET: &str = "Sekret-7fQ2x9";
const ENCODED: &str = "Sekret%2D7fQ2x9%40";

/// A failure path: its name, the arguments and the environment.
type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, String)>);

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .args(args)
        .env("RUST_LOG", "trace")
        .env_remove("OUTBOX_STORE")
        .env_remove("OUTBOX_TO")
        // AWS clients never wait on an instance metadata service.
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run outbox")
}

fn assert_hidden(case: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for secret in [SECRET, ENCODED, "Sekret-7fQ2x9@"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{case}: the password printed\nstdout: {stdout}\nstderr: {stderr}"
        );
    }
    assert!(
        !stderr.contains("panicked"),
        "{case}: a panic\nstderr: {stderr}"
    );
}

#[test]
fn passwords_never_print_on_failure_paths() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = format!("sqlite://{}", dir.path().join("s.db").display());
    let pg = |rest: &str| format!("postgres://app:{SECRET}@{rest}");
    let cases: Vec<Case> = vec![
        (
            "an unknown option",
            vec![
                "status".into(),
                "--store".into(),
                pg("127.0.0.1:5432/test?bogus=1"),
            ],
            vec![],
        ),
        (
            "an unknown option, --store=URL",
            vec![
                "status".into(),
                format!("--store={}", pg("127.0.0.1:5432/test?bogus=1")),
            ],
            vec![],
        ),
        (
            "a malformed host",
            vec!["status".into(), "--store".into(), pg("[::1:5432/db")],
            vec![],
        ),
        (
            "a bad port",
            vec!["migrate".into(), "--store".into(), pg("127.0.0.1:99999/db")],
            vec![],
        ),
        (
            "a role that does not exist",
            vec![
                "status".into(),
                "--store".into(),
                format!("postgres://no_such_role_7f:{SECRET}@127.0.0.1:5432/test"),
            ],
            vec![],
        ),
        (
            "a database that does not exist",
            vec![
                "purge".into(),
                "--store".into(),
                pg("127.0.0.1:5432/no_such_db_7f"),
                "--older-than".into(),
                "7d".into(),
            ],
            vec![],
        ),
        (
            "a percent-encoded password",
            vec![
                "status".into(),
                "--store".into(),
                format!("postgres://app:{ENCODED}@127.0.0.1:5432/test?bogus=1"),
            ],
            vec![],
        ),
        (
            "NATS refuses the connection",
            vec![
                "relay".into(),
                "--store".into(),
                sqlite.clone(),
                "--to".into(),
                format!("nats://natsuser:{SECRET}@127.0.0.1:1"),
                "--once".into(),
            ],
            vec![],
        ),
        (
            "RabbitMQ refuses the connection",
            vec![
                "relay".into(),
                "--store".into(),
                sqlite.clone(),
                "--to".into(),
                format!("amqp://guest:{SECRET}@127.0.0.1:1/%2f"),
                "--once".into(),
            ],
            vec![],
        ),
        (
            "RabbitMQ refuses the credentials",
            vec![
                "relay".into(),
                "--store".into(),
                sqlite.clone(),
                "--to".into(),
                format!("amqp://guest:{SECRET}@127.0.0.1:5672/%2f"),
                "--once".into(),
            ],
            vec![],
        ),
        (
            "an unknown target option",
            vec![
                "relay".into(),
                "--store".into(),
                sqlite.clone(),
                "--to".into(),
                format!("nats://natsuser:{SECRET}@127.0.0.1:4222?bogus=1"),
            ],
            vec![],
        ),
        (
            "the store from the environment, refused",
            vec!["status".into()],
            vec![("OUTBOX_STORE", pg("127.0.0.1:5432/test?bogus=1"))],
        ),
        (
            "the target from the environment, refused",
            vec![
                "relay".into(),
                "--store".into(),
                sqlite.clone(),
                "--once".into(),
            ],
            vec![("OUTBOX_TO", format!("nats://natsuser:{SECRET}@127.0.0.1:1"))],
        ),
        (
            "help with the URLs in the environment",
            vec!["relay".into(), "--help".into()],
            vec![
                ("OUTBOX_STORE", pg("db:5432/shop")),
                ("OUTBOX_TO", format!("nats://n:{SECRET}@nats:4222")),
            ],
        ),
    ];
    for (case, args, env) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run(&args, &env);
        assert_hidden(case, &out);
        if !args.contains(&"--help") {
            assert!(!out.status.success(), "{case}: succeeded");
        }
    }
}

#[test]
fn the_store_and_target_come_from_the_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = format!("sqlite://{}", dir.path().join("env.db").display());
    let out = run(
        &[
            "bench",
            "--store",
            &sqlite,
            "--events",
            "10",
            "--duration",
            "0s",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["status", "--json"], &[("OUTBOX_STORE", &sqlite)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &["relay", "--once"],
        &[("OUTBOX_STORE", &sqlite), ("OUTBOX_TO", "null://")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
