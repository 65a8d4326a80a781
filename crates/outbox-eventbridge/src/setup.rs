//! Creating what the publisher needs, idempotently: for deployment scripts,
//! the demo and tests.

use aws_sdk_eventbridge::types::{RuleState, Target};
use aws_sdk_eventbridge::Client;
use outbox_core::StoreError;

/// The ARN of bus `name`, creating the bus if it does not exist
/// (`"default"` always exists and is only looked up).
pub async fn ensure_bus(client: &Client, name: &str) -> Result<String, StoreError> {
    match client.describe_event_bus().name(name).send().await {
        Ok(out) => {
            return out
                .arn()
                .map(str::to_owned)
                .ok_or_else(|| StoreError::Config(format!("event bus {name} has no ARN")))
        }
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) => {}
        Err(err) => return Err(outbox_aws::store_error("DescribeEventBus", err)),
    }
    match client.create_event_bus().name(name).send().await {
        Ok(out) => out
            .event_bus_arn()
            .map(str::to_owned)
            .ok_or_else(|| StoreError::Config(format!("created event bus {name} has no ARN"))),
        // Created meanwhile by someone else.
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_resource_already_exists_exception()) =>
        {
            let out = client
                .describe_event_bus()
                .name(name)
                .send()
                .await
                .map_err(|e| outbox_aws::store_error("DescribeEventBus", e))?;
            out.arn()
                .map(str::to_owned)
                .ok_or_else(|| StoreError::Config(format!("event bus {name} has no ARN")))
        }
        Err(err) => Err(outbox_aws::store_error("CreateEventBus", err)),
    }
}

/// Makes rule `rule_name` on `bus` match `event_pattern_json` and deliver
/// to the SQS queue `queue_arn`. Safe to call again: the rule and its one
/// target are overwritten. The queue must allow EventBridge to send to it
/// (`outbox_sqs::setup::allow_senders`).
pub async fn ensure_rule_to_queue(
    client: &Client,
    bus: &str,
    rule_name: &str,
    queue_arn: &str,
    event_pattern_json: &str,
) -> Result<(), StoreError> {
    if serde_json::from_str::<serde_json::Value>(event_pattern_json).is_err() {
        return Err(StoreError::Config(format!(
            "the event pattern of rule {rule_name} is not JSON: {event_pattern_json}"
        )));
    }
    client
        .put_rule()
        .name(rule_name)
        .event_bus_name(bus)
        .event_pattern(event_pattern_json)
        .state(RuleState::Enabled)
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("PutRule", e))?;
    let target = Target::builder()
        .id("queue")
        .arn(queue_arn)
        .build()
        .map_err(|e| StoreError::Config(format!("rule target: {e}")))?;
    let out = client
        .put_targets()
        .rule(rule_name)
        .event_bus_name(bus)
        .targets(target)
        .send()
        .await
        .map_err(|e| outbox_aws::store_error("PutTargets", e))?;
    if out.failed_entry_count() > 0 {
        let reasons: Vec<String> = out
            .failed_entries()
            .iter()
            .map(|f| {
                format!(
                    "{}: {}",
                    f.error_code().unwrap_or("unknown"),
                    f.error_message().unwrap_or("")
                )
            })
            .collect();
        return Err(StoreError::Config(format!(
            "PutTargets refused the queue target of rule {rule_name}: {}",
            reasons.join("; ")
        )));
    }
    Ok(())
}

/// An event pattern matching every event from `source`.
pub fn source_pattern(source: &str) -> String {
    serde_json::json!({ "source": [source] }).to_string()
}
