//! Store and target URLs, parsed once into typed values.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use outbox_core::secret::redact_url;
use outbox_core::DeadLetterPolicy;
use outbox_nats::{SubjectTemplate, DEFAULT_SUBJECT_TEMPLATE};

use crate::error::RegistryError;

/// A store named by URL: `sqlite://FILE`, `dynamodb://TABLE` or
/// `postgres://USER@HOST:PORT/DB`, with options after `?` (`shape=polling`,
/// `schema=NAME`, `dead_letters=park`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    Sqlite {
        path: PathBuf,
        dead_letters: DeadLetterPolicy,
    },
    /// The outbox table on DynamoDB, in the stream shape (read through
    /// DynamoDB Streams) or the polling shape (`?shape=polling`).
    DynamoDb {
        table: String,
        shape: DynamoShape,
        dead_letters: DeadLetterPolicy,
    },
    /// An outbox in a schema of a PostgreSQL database. `url` is the
    /// connection URL handed to the driver (without this program's options);
    /// it may hold a password, which `Display` never shows.
    Postgres {
        url: String,
        schema: String,
        dead_letters: DeadLetterPolicy,
        /// Wake relays by LISTEN/NOTIFY (`listen=false` behind a pooler in
        /// transaction mode, which cannot keep a listening session).
        listen: bool,
        /// Settled events between two vacuums of the queue tables by the
        /// relays (`queue_vacuum_every=N`, 0: left to autovacuum); `None`:
        /// the store's default.
        queue_vacuum_every: Option<u64>,
    },
}

/// Which DynamoDB storage shape a `dynamodb://` store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DynamoShape {
    Stream,
    Polling,
}

/// DynamoDB table names: 3 to 255 of `a-z A-Z 0-9 _ - .`.
fn valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

const STORES: &str =
    "sqlite://FILE, dynamodb://TABLE[?shape=polling], postgres://USER@HOST:PORT/DB[?schema=NAME]";

/// Options of a `postgres://` URL that go to the driver as they are.
const POSTGRES_DRIVER_OPTIONS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "options",
];

/// The schema of a `postgres://` store when none is given.
pub const DEFAULT_POSTGRES_SCHEMA: &str = outbox_postgres::DEFAULT_SCHEMA;

/// The stream of a `nats://` target when none is given.
pub const DEFAULT_NATS_STREAM: &str = "OUTBOX";

/// The exchange of an `amqp://` target when none is given.
pub const DEFAULT_AMQP_EXCHANGE: &str = "outbox";

/// Checks a server's URL, `scheme://[USER[:PASSWORD]@]HOST[:PORT][/PATH]`
/// (`rest` is what follows `scheme://`, without the query): there is a host,
/// a port is a number. Returns the path, without its leading `/`.
fn parse_server<'a>(url: &str, rest: &'a str, example: &str) -> Result<&'a str, RegistryError> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    // The password may hold `@` or `:` once percent-encoded only, so the
    // last `@` ends the user part.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        // An IPv6 address in brackets has colons of its own.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (hostport, None),
    };
    if host.is_empty() {
        return Err(invalid(
            url,
            format!("names no host; expected e.g. {example}"),
        ));
    }
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err(invalid(
                url,
                format!("port `{port}` is not a number from 0 to 65535"),
            ));
        }
    }
    Ok(path)
}

/// A query value with its `%XX` escapes decoded.
fn decode(url: &str, value: &str) -> Result<String, RegistryError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = value
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| invalid(url, format!("`{value}` has a bad %-escape")))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid(url, format!("`{value}` is not UTF-8 once decoded")))
}

/// PostgreSQL schema names as outbox-postgres takes them: 1 to 48
/// lower-case letters, digits and `_`, not starting with a digit or `pg_`.
fn valid_schema_name(name: &str) -> bool {
    (1..=48).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.starts_with("pg_")
}

/// JetStream stream names: no whitespace, `.`, `*`, `>`, slashes or
/// control characters, at most 255 bytes.
fn valid_stream_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && !name.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
        })
}

/// AMQP 0-9-1 exchange names: 1 to 255 of `a-z A-Z 0-9 - _ . :`.
fn valid_exchange_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn parse_postgres(url: &str, rest: &str) -> Result<StoreUrl, RegistryError> {
    const EXAMPLE: &str = "postgres://postgres@127.0.0.1:5432/app";
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    let database = parse_server(url, base, EXAMPLE)?;
    if database.is_empty() || database.contains('/') {
        return Err(invalid(
            url,
            format!("names no database (or more than one); expected e.g. {EXAMPLE}"),
        ));
    }
    let mut schema = DEFAULT_POSTGRES_SCHEMA.to_owned();
    let mut dead_letters = DeadLetterPolicy::default();
    let mut listen = true;
    let mut queue_vacuum_every = None;
    let mut driver = Vec::new();
    for option in query.split('&').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some(("schema", value)) => {
                schema = decode(url, value)?;
                if !valid_schema_name(&schema) {
                    return Err(invalid(
                        url,
                        format!(
                            "schema `{schema}`: use 1 to 48 lower-case letters, digits and `_`, \
                             not starting with a digit or `pg_`"
                        ),
                    ));
                }
            }
            Some(("dead_letters", value)) => dead_letters = parse_policy(url, value)?,
            Some(("listen", "true")) => listen = true,
            Some(("listen", "false")) => listen = false,
            Some(("listen", other)) => {
                return Err(invalid(
                    url,
                    format!("listen={other}: expected listen=true or listen=false"),
                ))
            }
            Some(("queue_vacuum_every", value)) => {
                queue_vacuum_every = Some(value.parse().map_err(|_| {
                    invalid(
                        url,
                        format!(
                            "queue_vacuum_every={value}: expected a number of events (0: never)"
                        ),
                    )
                })?)
            }
            Some((key, _)) if POSTGRES_DRIVER_OPTIONS.contains(&key) => driver.push(option),
            _ => {
                return Err(invalid(
                    url,
                    format!(
                        "unknown option `{option}`; known options: schema=NAME, \
                         dead_letters=continue|park, listen=true|false, queue_vacuum_every=N, {}",
                        POSTGRES_DRIVER_OPTIONS.join(", ")
                    ),
                ))
            }
        }
    }
    let scheme = url.split_once("://").map_or("postgres", |(s, _)| s);
    let mut connect = format!("{scheme}://{base}");
    if !driver.is_empty() {
        connect = format!("{connect}?{}", driver.join("&"));
    }
    Ok(StoreUrl::Postgres {
        url: connect,
        schema,
        dead_letters,
        listen,
        queue_vacuum_every,
    })
}

impl StoreUrl {
    /// A SQLite store at `path`, with the default dead-letter policy.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        StoreUrl::Sqlite {
            path: path.into(),
            dead_letters: DeadLetterPolicy::default(),
        }
    }

    /// Whether opening the store needs the AWS configuration.
    pub fn is_aws(&self) -> bool {
        matches!(self, StoreUrl::DynamoDb { .. })
    }

    pub fn dead_letter_policy(&self) -> DeadLetterPolicy {
        match self {
            StoreUrl::Sqlite { dead_letters, .. }
            | StoreUrl::DynamoDb { dead_letters, .. }
            | StoreUrl::Postgres { dead_letters, .. } => *dead_letters,
        }
    }
}

fn parse_policy(url: &str, value: &str) -> Result<DeadLetterPolicy, RegistryError> {
    match value {
        "continue" => Ok(DeadLetterPolicy::Continue),
        "park" => Ok(DeadLetterPolicy::Park),
        other => Err(invalid(
            url,
            format!("dead_letters={other}: expected dead_letters=continue or dead_letters=park"),
        )),
    }
}

fn invalid(url: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::InvalidUrl {
        url: redact_url(url),
        reason: reason.into(),
    }
}

impl FromStr for StoreUrl {
    type Err = RegistryError;

    fn from_str(url: &str) -> Result<Self, RegistryError> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            invalid(
                url,
                "not a store URL; expected e.g. sqlite://outbox.db, dynamodb://Outbox \
                 or postgres://postgres@127.0.0.1:5432/app",
            )
        })?;
        if matches!(scheme, "postgres" | "postgresql") {
            return parse_postgres(url, rest);
        }
        let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut dead_letters = DeadLetterPolicy::default();
        let mut shape = None;
        for option in query.split('&').filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some(("dead_letters", value)) => dead_letters = parse_policy(url, value)?,
                Some(("shape", "stream")) if scheme == "dynamodb" => {
                    shape = Some(DynamoShape::Stream)
                }
                Some(("shape", "polling")) if scheme == "dynamodb" => {
                    shape = Some(DynamoShape::Polling)
                }
                Some(("shape", other)) if scheme == "dynamodb" => {
                    return Err(invalid(
                        url,
                        format!("shape={other}: expected shape=stream or shape=polling"),
                    ))
                }
                _ => {
                    let known = if scheme == "dynamodb" {
                        "shape=stream|polling, dead_letters=continue|park"
                    } else {
                        "dead_letters=continue|park"
                    };
                    return Err(invalid(
                        url,
                        format!("unknown option `{option}`; known options: {known}"),
                    ));
                }
            }
        }
        match scheme {
            "sqlite" if name.is_empty() => Err(invalid(
                url,
                "sqlite:// needs a file, as in sqlite://outbox.db",
            )),
            "sqlite" => Ok(StoreUrl::Sqlite {
                path: PathBuf::from(name),
                dead_letters,
            }),
            "dynamodb" if !valid_table_name(name) => Err(invalid(
                url,
                format!("`{name}` is not a DynamoDB table name (3 to 255 of a-z A-Z 0-9 _ - .)"),
            )),
            "dynamodb" => Ok(StoreUrl::DynamoDb {
                table: name.to_owned(),
                shape: shape.unwrap_or(DynamoShape::Stream),
                dead_letters,
            }),
            other => Err(invalid(
                url,
                format!("unknown store `{other}://`; supported: {STORES}"),
            )),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut options: Vec<String> = Vec::new();
        match self {
            StoreUrl::Sqlite { path, .. } => write!(f, "sqlite://{}", path.display())?,
            StoreUrl::DynamoDb { table, shape, .. } => {
                write!(f, "dynamodb://{table}")?;
                if *shape == DynamoShape::Polling {
                    options.push("shape=polling".to_owned());
                }
            }
            StoreUrl::Postgres {
                url,
                schema,
                listen,
                queue_vacuum_every,
                ..
            } => {
                // The driver's options already follow a `?`.
                let (base, driver) = url.split_once('?').unwrap_or((url, ""));
                f.write_str(&redact_url(base))?;
                if schema != DEFAULT_POSTGRES_SCHEMA {
                    options.push(format!("schema={schema}"));
                }
                if !listen {
                    options.push("listen=false".to_owned());
                }
                if let Some(every) = queue_vacuum_every {
                    options.push(format!("queue_vacuum_every={every}"));
                }
                options.extend(
                    driver
                        .split('&')
                        .filter(|o| !o.is_empty())
                        .map(str::to_owned),
                );
            }
        }
        if self.dead_letter_policy() == DeadLetterPolicy::Park {
            options.push("dead_letters=park".to_owned());
        }
        if !options.is_empty() {
            write!(f, "?{}", options.join("&"))?;
        }
        Ok(())
    }
}

/// A broker named by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetUrl {
    /// Accepts everything, sends nothing: for benchmarks.
    Null,
    /// CloudEvent JSON lines on standard output.
    Stdout,
    /// The in-process broker of the demo.
    Memory,
    /// An event bus name or ARN.
    EventBridge {
        bus: String,
    },
    /// A queue URL, or a name to look its URL up by.
    Sqs {
        queue: String,
    },
    Sns {
        topic_arn: String,
    },
    /// A NATS JetStream stream. `server` is the URL the client connects to
    /// (`nats://HOST:PORT`, with a user part if given).
    Nats {
        server: String,
        stream: String,
        subject: SubjectTemplate,
    },
    /// A RabbitMQ exchange. `uri` is the AMQP URI the client connects to
    /// (`amqp://USER:PASS@HOST:PORT/VHOST`); `Display` never shows the password.
    Amqp {
        uri: String,
        exchange: String,
    },
}

const TARGETS: &str = "eventbridge://BUS, sqs://QUEUE_URL_OR_NAME, sns://TOPIC_ARN, \
     nats://HOST:PORT[?stream=NAME&subject=TEMPLATE], amqp://USER:PASS@HOST:PORT[/VHOST][?exchange=NAME], \
     null://, stdout://, memory://";

fn parse_nats(url: &str, scheme: &str, rest: &str) -> Result<TargetUrl, RegistryError> {
    const EXAMPLE: &str = "nats://127.0.0.1:4222?stream=OUTBOX";
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !parse_server(url, base, EXAMPLE)?.is_empty() {
        return Err(invalid(
            url,
            format!("a NATS URL has no path; name the stream with ?stream=NAME, as in {EXAMPLE}"),
        ));
    }
    let mut stream = DEFAULT_NATS_STREAM.to_owned();
    let mut subject = SubjectTemplate::default();
    for option in query.split('&').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some(("stream", value)) => {
                stream = decode(url, value)?;
                if !valid_stream_name(&stream) {
                    return Err(invalid(
                        url,
                        format!(
                            "stream `{stream}`: a JetStream stream name has no spaces, \
                             `.`, `*`, `>` or slashes"
                        ),
                    ));
                }
            }
            Some(("subject", value)) => {
                subject = SubjectTemplate::parse(&decode(url, value)?)
                    .map_err(|e| invalid(url, e.to_string()))?;
            }
            _ => {
                return Err(invalid(
                    url,
                    format!(
                        "unknown option `{option}`; known options: stream=NAME, subject=TEMPLATE"
                    ),
                ))
            }
        }
    }
    Ok(TargetUrl::Nats {
        server: format!("{scheme}://{base}"),
        stream,
        subject,
    })
}

fn parse_amqp(url: &str, scheme: &str, rest: &str) -> Result<TargetUrl, RegistryError> {
    const EXAMPLE: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?exchange=outbox";
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    if parse_server(url, base, EXAMPLE)?.contains('/') {
        return Err(invalid(
            url,
            "a virtual host is one path segment (write `/` inside it as %2f)",
        ));
    }
    let mut exchange = DEFAULT_AMQP_EXCHANGE.to_owned();
    for option in query.split('&').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some(("exchange", value)) => {
                exchange = decode(url, value)?;
                if !valid_exchange_name(&exchange) {
                    return Err(invalid(
                        url,
                        format!("exchange `{exchange}`: use 1 to 255 of a-z A-Z 0-9 - _ . :"),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    url,
                    format!("unknown option `{option}`; known options: exchange=NAME"),
                ))
            }
        }
    }
    Ok(TargetUrl::Amqp {
        uri: format!("{scheme}://{base}"),
        exchange,
    })
}

impl TargetUrl {
    /// Whether opening the target needs the AWS configuration.
    pub fn is_aws(&self) -> bool {
        matches!(
            self,
            TargetUrl::EventBridge { .. } | TargetUrl::Sqs { .. } | TargetUrl::Sns { .. }
        )
    }
}

/// Whether `queue` is a complete queue URL: scheme, host, account, name.
fn complete_queue_url(queue: &str) -> bool {
    let rest = queue
        .strip_prefix("https://")
        .or_else(|| queue.strip_prefix("http://"))
        .unwrap_or("");
    let parts: Vec<&str> = rest.split('/').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty())
}

impl FromStr for TargetUrl {
    type Err = RegistryError;

    fn from_str(url: &str) -> Result<Self, RegistryError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(url, format!("not a target URL; expected one of {TARGETS}")))?;
        let rest = rest.trim();
        let needs_name = || invalid(url, "names no bus, queue or topic after `://`");
        match scheme {
            "null" => Ok(TargetUrl::Null),
            "stdout" => Ok(TargetUrl::Stdout),
            "memory" => Ok(TargetUrl::Memory),
            "nats" | "tls" => parse_nats(url, scheme, rest),
            "amqp" | "amqps" => parse_amqp(url, scheme, rest),
            "eventbridge" | "sqs" | "sns" if rest.is_empty() => Err(needs_name()),
            "eventbridge" => Ok(TargetUrl::EventBridge {
                bus: rest.to_owned(),
            }),
            "sqs" if rest.contains("://") && !complete_queue_url(rest) => Err(invalid(
                url,
                "an SQS queue URL has a host, an account and a queue name, as in \
                 sqs://https://sqs.us-east-1.amazonaws.com/123456789012/orders",
            )),
            "sqs" => Ok(TargetUrl::Sqs {
                queue: rest.to_owned(),
            }),
            "sns" if rest.starts_with("arn:") && rest.split(':').count() == 6 => {
                Ok(TargetUrl::Sns {
                    topic_arn: rest.to_owned(),
                })
            }
            "sns" => Err(invalid(
                url,
                "sns:// takes a topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
            )),
            other => Err(invalid(
                url,
                format!("unknown target `{other}://`; supported: {TARGETS}"),
            )),
        }
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetUrl::Null => f.write_str("null://"),
            TargetUrl::Stdout => f.write_str("stdout://"),
            TargetUrl::Memory => f.write_str("memory://"),
            TargetUrl::EventBridge { bus } => write!(f, "eventbridge://{bus}"),
            TargetUrl::Sqs { queue } => write!(f, "sqs://{queue}"),
            TargetUrl::Sns { topic_arn } => write!(f, "sns://{topic_arn}"),
            TargetUrl::Nats {
                server,
                stream,
                subject,
            } => {
                f.write_str(&redact_url(server))?;
                let mut options = Vec::new();
                if stream != DEFAULT_NATS_STREAM {
                    options.push(format!("stream={stream}"));
                }
                if subject.as_str() != DEFAULT_SUBJECT_TEMPLATE {
                    options.push(format!("subject={}", subject.as_str()));
                }
                if !options.is_empty() {
                    write!(f, "?{}", options.join("&"))?;
                }
                Ok(())
            }
            TargetUrl::Amqp { uri, exchange } => {
                f.write_str(&redact_url(uri))?;
                if exchange != DEFAULT_AMQP_EXCHANGE {
                    write!(f, "?exchange={exchange}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(url: &str) -> Result<StoreUrl, String> {
        url.parse::<StoreUrl>().map_err(|e| e.to_string())
    }

    #[test]
    fn parses_store_urls_and_their_options() {
        assert_eq!(store("sqlite://a/b.db"), Ok(StoreUrl::sqlite("a/b.db")));
        assert_eq!(
            store("sqlite:///tmp/x.db"),
            Ok(StoreUrl::sqlite("/tmp/x.db"))
        );
        assert_eq!(
            store("sqlite://x.db?dead_letters=park"),
            Ok(StoreUrl::Sqlite {
                path: "x.db".into(),
                dead_letters: DeadLetterPolicy::Park
            })
        );
        assert_eq!(
            store("dynamodb://Outbox"),
            Ok(StoreUrl::DynamoDb {
                table: "Outbox".into(),
                shape: DynamoShape::Stream,
                dead_letters: DeadLetterPolicy::Continue,
            })
        );
        for url in [
            "sqlite://x.db",
            "sqlite://x.db?dead_letters=park",
            "dynamodb://Outbox",
            "dynamodb://Outbox?shape=polling",
            "dynamodb://Outbox?shape=polling&dead_letters=park",
            "dynamodb://Outbox?dead_letters=park",
        ] {
            assert_eq!(store(url).unwrap().to_string(), url);
        }
        assert_eq!(
            store("dynamodb://Outbox?dead_letters=park&shape=polling")
                .unwrap()
                .to_string(),
            "dynamodb://Outbox?shape=polling&dead_letters=park"
        );
    }

    #[test]
    fn refuses_bad_store_urls_with_the_reason() {
        for (url, says) in [
            ("sqlite://", "needs a file"),
            ("mysql://x", "unknown store"),
            ("outbox.db", "not a store URL"),
            ("dynamodb://x", "not a DynamoDB table name"),
            ("dynamodb://Outbox?shape=queue", "shape=queue"),
            ("dynamodb://Outbox?dead_letters=drop", "dead_letters=drop"),
            (
                "sqlite://x.db?shape=polling",
                "unknown option `shape=polling`",
            ),
            ("sqlite://x.db?wal", "unknown option `wal`"),
        ] {
            let err = store(url).unwrap_err();
            assert!(
                err.contains(says) && err.contains(&redact_url(url)),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn parses_target_urls() {
        for url in [
            "eventbridge://orders-bus",
            "sqs://orders",
            "sqs://https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo",
            "sns://arn:aws:sns:us-east-1:123456789012:orders",
            "null://",
            "stdout://",
            "memory://",
        ] {
            assert_eq!(url.parse::<TargetUrl>().unwrap().to_string(), url);
        }
        assert!("sqs://orders".parse::<TargetUrl>().unwrap().is_aws());
        assert!(!"null://".parse::<TargetUrl>().unwrap().is_aws());
        for (url, says) in [
            ("kafka://x", "unknown target"),
            ("orders", "not a target URL"),
            ("eventbridge://", "names no bus"),
            ("sqs://  ", "names no bus"),
            ("sns://orders", "topic ARN"),
            (
                "sqs://http://127.0.0.1:5000/",
                "host, an account and a queue name",
            ),
        ] {
            let err = url.parse::<TargetUrl>().unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains(&redact_url(url)),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn parses_postgres_stores_and_keeps_passwords_out_of_sight() {
        assert_eq!(
            store("postgres://postgres@127.0.0.1:5432/test"),
            Ok(StoreUrl::Postgres {
                url: "postgres://postgres@127.0.0.1:5432/test".into(),
                schema: "outbox".into(),
                dead_letters: DeadLetterPolicy::Continue,
                listen: true,
                queue_vacuum_every: None,
            })
        );
        assert_eq!(
            store("postgres://app@db:5432/shop?schema=orders_outbox&dead_letters=park&sslmode=require"),
            Ok(StoreUrl::Postgres {
                url: "postgres://app@db:5432/shop?sslmode=require".into(),
                schema: "orders_outbox".into(),
                dead_letters: DeadLetterPolicy::Park,
                listen: true,
                queue_vacuum_every: None,
            })
        );
        assert_eq!(
            store("postgres://app@pgbouncer:6432/shop?listen=false"),
            Ok(StoreUrl::Postgres {
                url: "postgres://app@pgbouncer:6432/shop".into(),
                schema: "outbox".into(),
                dead_letters: DeadLetterPolicy::Continue,
                listen: false,
                queue_vacuum_every: None,
            })
        );
        for url in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgresql://app@db/shop?schema=orders&dead_letters=park",
            "postgres://app@db:5432/shop?schema=orders&sslmode=require",
            "postgres://app@db:5432/shop?schema=orders&listen=false&sslmode=require",
            "postgres://app@db:5432/shop?schema=orders&queue_vacuum_every=0",
        ] {
            assert_eq!(store(url).unwrap().to_string(), url);
        }
        let secret = store("postgres://app:s3cret@db:5432/shop").unwrap();
        assert_eq!(secret.to_string(), "postgres://app:***@db:5432/shop");
        assert!(matches!(&secret, StoreUrl::Postgres { url, .. } if url.contains("s3cret")));
        assert!(!secret.is_aws());
    }

    #[test]
    fn refuses_bad_postgres_urls_with_the_reason() {
        for (url, says) in [
            ("postgres://127.0.0.1:5432", "names no database"),
            ("postgres://127.0.0.1:5432/", "names no database"),
            ("postgres://@:5432/db", "names no host"),
            ("postgres://h:port/db", "port `port`"),
            ("postgres://h/db?schema=Orders", "schema `Orders`"),
            ("postgres://h/db?schema=pg_x", "schema `pg_x`"),
            ("postgres://h/db?schema=", "schema ``"),
            (
                "postgres://h/db?shape=polling",
                "unknown option `shape=polling`",
            ),
            ("postgres://h/db?dead_letters=drop", "dead_letters=drop"),
            (
                "postgres://h/db?listen=no",
                "expected listen=true or listen=false",
            ),
            (
                "postgres://h/db?queue_vacuum_every=-1",
                "expected a number of events",
            ),
        ] {
            let err = store(url).unwrap_err();
            assert!(
                err.contains(says) && err.contains(&redact_url(url)),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn parses_nats_and_amqp_targets() {
        let target = |url: &str| url.parse::<TargetUrl>().map_err(|e| e.to_string());
        assert_eq!(
            target("nats://127.0.0.1:4222"),
            Ok(TargetUrl::Nats {
                server: "nats://127.0.0.1:4222".into(),
                stream: "OUTBOX".into(),
                subject: SubjectTemplate::parse("events.{aggregatetype}.{type}").unwrap(),
            })
        );
        assert_eq!(
            target("nats://h:4222?stream=SHOP&subject=shop.%7Baggregatetype%7D.{type}"),
            Ok(TargetUrl::Nats {
                server: "nats://h:4222".into(),
                stream: "SHOP".into(),
                subject: SubjectTemplate::parse("shop.{aggregatetype}.{type}").unwrap(),
            })
        );
        assert_eq!(
            target("amqp://guest:guest@127.0.0.1:5672"),
            Ok(TargetUrl::Amqp {
                uri: "amqp://guest:guest@127.0.0.1:5672".into(),
                exchange: "outbox".into(),
            })
        );
        assert_eq!(
            target("amqp://u:p@rabbit:5672/%2f?exchange=shop.events"),
            Ok(TargetUrl::Amqp {
                uri: "amqp://u:p@rabbit:5672/%2f".into(),
                exchange: "shop.events".into(),
            })
        );
        for url in [
            "nats://127.0.0.1:4222",
            "nats://127.0.0.1:4222?stream=SHOP&subject=shop.{aggregatetype}.{type}",
            "amqp://guest@127.0.0.1:5672/prod?exchange=events",
        ] {
            assert_eq!(target(url).unwrap().to_string(), url);
        }
        assert_eq!(
            target("amqp://guest:guest@h:5672/v?exchange=x").unwrap(),
            target("amqp://guest:guest@h:5672/v?exchange=x").unwrap()
        );
        assert_eq!(
            "amqp://guest:guest@h:5672/v?exchange=x"
                .parse::<TargetUrl>()
                .unwrap()
                .to_string(),
            "amqp://guest:***@h:5672/v?exchange=x"
        );
        assert!(!"nats://h:4222".parse::<TargetUrl>().unwrap().is_aws());
    }

    #[test]
    fn refuses_bad_nats_and_amqp_urls_with_the_reason() {
        for (url, says) in [
            ("nats://", "names no host"),
            ("nats://h:99999", "port `99999`"),
            ("nats://h:4222/OUTBOX", "?stream=NAME"),
            ("nats://h:4222?stream=a.b", "stream `a.b`"),
            ("nats://h:4222?stream=", "stream ``"),
            (
                "nats://h:4222?subject=events.>",
                "subject template `events.>`",
            ),
            ("nats://h:4222?subject=events.{id}", "unknown placeholder"),
            ("nats://h:4222?subject=a%zz", "bad %-escape"),
            ("nats://h:4222?queue=x", "unknown option `queue=x`"),
            ("amqp://", "names no host"),
            ("amqp://guest:guest@:5672", "names no host"),
            ("amqp://h:5672/a/b", "one path segment"),
            ("amqp://h?exchange=", "exchange ``"),
            ("amqp://h?exchange=a b", "exchange `a b`"),
            ("amqp://h?routing=x", "unknown option `routing=x`"),
        ] {
            let err = url.parse::<TargetUrl>().unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains(&redact_url(url)),
                "{url}: {err}"
            );
        }
    }
}
