//! The handlers' figures as CloudWatch embedded metric format: one JSON log
//! line per invocation that CloudWatch Logs turns into metrics, so alarms on
//! dead letters need no metric filter and no extra API call.

use outbox_core::BatchReport;

use crate::stream::InvocationReport;

/// The CloudWatch namespace of every figure.
pub const NAMESPACE: &str = "Outbox";
/// The dimension each figure is kept under.
pub const DIMENSION: &str = "FunctionName";
/// Lambda sets it to the function's name.
const FUNCTION_NAME_VAR: &str = "AWS_LAMBDA_FUNCTION_NAME";

/// One embedded-metric-format line: `metrics` as counts of `function_name`,
/// stamped `timestamp_ms` (ms since the epoch).
pub fn line(function_name: &str, metrics: &[(&str, u64)], timestamp_ms: i64) -> String {
    let definitions: Vec<_> = metrics
        .iter()
        .map(|(name, _)| serde_json::json!({ "Name": name, "Unit": "Count" }))
        .collect();
    let mut root = serde_json::Map::new();
    root.insert(
        "_aws".to_owned(),
        serde_json::json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [[DIMENSION]],
                "Metrics": definitions,
            }],
        }),
    );
    root.insert(DIMENSION.to_owned(), function_name.into());
    for (name, value) in metrics {
        root.insert((*name).to_owned(), (*value).into());
    }
    serde_json::Value::Object(root).to_string()
}

/// Writes one line for this invocation to standard output, where Lambda's
/// log capture picks it up (a tracing line around it would not parse).
pub fn emit(metrics: &[(&str, u64)]) {
    let function = std::env::var(FUNCTION_NAME_VAR).unwrap_or_else(|_| "local".to_owned());
    println!(
        "{}",
        line(&function, metrics, chrono::Utc::now().timestamp_millis())
    );
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The figures of one `PublishEvents` invocation.
pub fn stream_metrics(report: &InvocationReport) -> [(&'static str, u64); 5] {
    [
        ("Published", count(report.published)),
        ("Retried", count(report.retries)),
        ("DeadLettered", count(report.dead_lettered)),
        ("Malformed", count(report.malformed)),
        ("Unfinished", count(report.unfinished)),
    ]
}

/// The figures of one scheduled relay run.
pub fn batch_metrics(report: &BatchReport) -> [(&'static str, u64); 5] {
    [
        ("Claimed", count(report.claimed)),
        ("Published", count(report.published)),
        ("Retried", count(report.retried)),
        ("DeadLettered", count(report.dead_lettered)),
        ("Released", count(report.released)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_declares_each_metric_and_carries_its_value() {
        let text = line(
            "PublishEvents",
            &[("Published", 7), ("DeadLettered", 1)],
            1_700_000_000_000,
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let aws = &v["_aws"];
        assert_eq!(aws["Timestamp"], 1_700_000_000_000_i64);
        let directive = &aws["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], NAMESPACE);
        assert_eq!(directive["Dimensions"], serde_json::json!([[DIMENSION]]));
        let names: Vec<_> = directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["Name"].as_str().unwrap(), m["Unit"].as_str().unwrap()))
            .collect();
        assert_eq!(names, [("Published", "Count"), ("DeadLettered", "Count")]);
        assert_eq!(v[DIMENSION], "PublishEvents");
        assert_eq!(v["Published"], 7);
        assert_eq!(v["DeadLettered"], 1);
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn a_scheduled_run_reports_its_dead_letters() {
        let mut report = BatchReport::default();
        (report.claimed, report.published, report.dead_lettered) = (12, 10, 2);
        let v: serde_json::Value =
            serde_json::from_str(&line("ScheduledRelay", &batch_metrics(&report), 0)).unwrap();
        assert_eq!(
            (v["Claimed"].as_u64(), v["Published"].as_u64()),
            (Some(12), Some(10))
        );
        assert_eq!(v["DeadLettered"], 2);
        assert_eq!(v["Released"], 0);
    }
}
