//! Operator commands: migrate, status, dead letters, purge.

use std::time::Duration;

use chrono::Utc;
use clap::Subcommand;
use outbox_core::{DeadLetters, EventId, Purge, ReplaySelector, Stats};

use outbox_registry::Migrated;

use crate::target::{open_existing, StoreUrl};
use crate::url_arg::UrlParser;
use crate::{print_json, CliError};

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Dead-lettered events, oldest first, with their last error.
    List {
        #[arg(long, env = "OUTBOX_STORE", hide_env_values = true, value_parser = UrlParser::<StoreUrl>::new())]
        store: StoreUrl,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Make dead letters pending again so the relay publishes them.
    Replay {
        #[arg(long, env = "OUTBOX_STORE", hide_env_values = true, value_parser = UrlParser::<StoreUrl>::new())]
        store: StoreUrl,
        /// Event ids to replay (repeatable).
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<EventId>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Give up on dead letters for good, so an aggregate parked behind one
    /// flows again (stores opened with `?dead_letters=park`).
    Skip {
        #[arg(long, env = "OUTBOX_STORE", hide_env_values = true, value_parser = UrlParser::<StoreUrl>::new())]
        store: StoreUrl,
        /// Event ids to skip (repeatable).
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<EventId>,
        /// Skip every dead letter.
        #[arg(long)]
        all: bool,
    },
}

pub async fn migrate(url: &StoreUrl) -> Result<(), CliError> {
    match url.migrate().await? {
        Migrated::Postgres { schema, version } => {
            println!("{url}: schema `{schema}` is at version {version}")
        }
        Migrated::OnOpen => {
            println!("{url}: nothing to do: a SQLite store runs its migrations when it is opened")
        }
        Migrated::Nothing => println!("{url}: nothing to do: DynamoDB tables have no migrations"),
        _ => println!("{url}: migrated"),
    }
    Ok(())
}

pub async fn status(
    url: &StoreUrl,
    json: bool,
    max_pending_age: Option<Duration>,
    fail_on_dead: bool,
) -> Result<(), CliError> {
    let stats = open_existing(url).await?.stats().await?;
    let age = stats
        .oldest_pending_at
        .map(|t| (Utc::now() - t).to_std().unwrap_or(Duration::ZERO));
    if json {
        print_json(&serde_json::json!({
            "pending": stats.pending,
            "published": stats.published,
            "dead": stats.dead,
            "oldest_pending_age_s": age.map(|a| a.as_secs_f64()),
            "lost": stats.lost,
            "last_error": stats.last_error,
            "created_in_future": stats.created_in_future,
        }));
    } else {
        println!("store:      {url}");
        println!("pending:    {}", stats.pending);
        println!("published:  {}", stats.published);
        println!("dead:       {}", stats.dead);
        match age {
            Some(age) => println!(
                "oldest pending: {} ago",
                humantime::format_duration(round(age))
            ),
            None => println!("oldest pending: none"),
        }
        println!("lost:       {}", stats.lost);
        if stats.created_in_future > 0 {
            println!(
                "created in the future: {} pending event(s) claim a creation time ahead of the store's clock; their age counts from when they were written",
                stats.created_in_future
            );
        }
        println!(
            "last error: {}",
            stats.last_error.as_deref().unwrap_or("none")
        );
    }
    // Events lost before a relay could read them always need a person.
    if stats.lost > 0 {
        return Err(CliError::Check(format!(
            "{} event(s) were lost before they could be relayed (see `outbox dead-letters list`)",
            stats.lost
        )));
    }
    if let (Some(age), Some(max)) = (age, max_pending_age) {
        if age > max {
            return Err(CliError::Check(format!(
                "the oldest pending event is {} old, more than {}",
                humantime::format_duration(round(age)),
                humantime::format_duration(max)
            )));
        }
    }
    if fail_on_dead && stats.dead > 0 {
        return Err(CliError::Check(format!(
            "{} event(s) are dead-lettered",
            stats.dead
        )));
    }
    Ok(())
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

pub async fn dead_letters(cmd: DeadLetterCommand) -> Result<(), CliError> {
    match cmd {
        DeadLetterCommand::List { store, limit, json } => {
            let opened = open_existing(&store).await?;
            let letters = opened.dead_letters(limit).await?;
            for d in &letters {
                if json {
                    print_json(d);
                } else {
                    let error = d.last_error.as_deref().unwrap_or("-");
                    match (&d.event, &d.raw) {
                        (Some(e), _) => println!(
                            "{}  {}/{} v{}  {}  attempts={}  error: {error}",
                            e.id,
                            e.aggregate_type,
                            e.aggregate_id,
                            e.aggregate_version,
                            e.event_type,
                            d.attempts,
                        ),
                        (None, raw) => println!(
                            "{}  MALFORMED  error: {error}  raw: {}",
                            d.reference,
                            raw.as_ref().map(|r| r.to_string()).unwrap_or_default()
                        ),
                    }
                }
            }
            // Say when the list is cut short, and how to see the rest.
            let total = if letters.len() < limit {
                letters.len() as u64
            } else {
                opened.stats().await?.dead
            };
            if total > letters.len() as u64 {
                eprintln!(
                    "{} of {total} dead letter(s) shown; pass --limit {total} to see them all",
                    letters.len()
                );
            } else if !json {
                eprintln!("{} dead letter(s)", letters.len());
            }
            Ok(())
        }
        DeadLetterCommand::Replay { store, ids, all } => {
            let which = selector(&ids, all);
            let replayed = open_existing(&store).await?.replay(which).await?;
            println!("replayed {replayed} dead letter(s)");
            check_all_found(&ids, all, replayed)
        }
        DeadLetterCommand::Skip { store, ids, all } => {
            let which = selector(&ids, all);
            let skipped = open_existing(&store).await?.skip(which).await?;
            println!("skipped {skipped} dead letter(s)");
            check_all_found(&ids, all, skipped)
        }
    }
}

fn selector(ids: &[EventId], all: bool) -> ReplaySelector {
    if all {
        ReplaySelector::All
    } else {
        ReplaySelector::Ids(ids.to_vec())
    }
}

fn check_all_found(ids: &[EventId], all: bool, done: u64) -> Result<(), CliError> {
    if !all && done < ids.len() as u64 {
        return Err(CliError::Usage(format!(
            "{} of the {} ids given are not dead letters",
            ids.len() as u64 - done,
            ids.len()
        )));
    }
    Ok(())
}

pub async fn purge(url: &StoreUrl, older_than: Duration) -> Result<(), CliError> {
    // An age past the calendar's start purges everything published: saturate.
    let before = outbox_core::time::sub(Utc::now(), older_than);
    let purged = open_existing(url).await?.purge_published(before).await?;
    println!(
        "purged {purged} published event(s) older than {}",
        humantime::format_duration(older_than)
    );
    Ok(())
}
