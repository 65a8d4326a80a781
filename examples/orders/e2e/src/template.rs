//! The event source mappings and queue settings as `infra/template.yaml`
//! declares them, so the local pollers behave as the deployed mappings do
//! and there is one source of truth. Without a template the contract's
//! values ([`StreamMapping::default`], [`QueueMapping::default`]) apply, and
//! a test compares those with the template when there is one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

use crate::esm::{QueueMapping, StreamMapping};

/// Logical IDs the template and the local run share.
pub const PUBLISH_EVENTS_FUNCTION: &str = "PublishEventsFunction";
pub const SHIPPING_FUNCTION: &str = "ShippingFunction";
pub const ORDERS_API_FUNCTION: &str = "OrdersApiFunction";
pub const SHIPPING_QUEUE: &str = "ShippingQueue";

/// What the run takes from the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub stream: StreamMapping,
    pub queue: QueueMapping,
    /// The Shipping queue's visibility timeout.
    pub visibility_timeout: Duration,
    /// Receives before SQS moves a message to the dead-letter queue.
    pub max_receive_count: u32,
    /// Function timeouts by logical ID, where the template sets them
    /// (`Timeout`, or `Globals.Function.Timeout`).
    pub timeouts: BTreeMap<String, Duration>,
    /// Where these came from: the template's path, or the defaults.
    pub origin: String,
}

impl Settings {
    /// The timeout of `function`: the template's, or `default`.
    pub fn timeout(&self, function: &str, default: Duration) -> Duration {
        self.timeouts.get(function).copied().unwrap_or(default)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            stream: StreamMapping::default(),
            queue: QueueMapping::default(),
            visibility_timeout: Duration::from_secs(60),
            max_receive_count: 5,
            timeouts: BTreeMap::new(),
            origin: "built-in defaults (the contract's values)".to_owned(),
        }
    }
}

/// A template that cannot be read, or lacks what the run needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TemplateError {
    pub path: String,
    pub reason: String,
}

/// Reads the settings from the template at `path`.
pub fn load(path: &Path) -> Result<Settings, TemplateError> {
    let text = std::fs::read_to_string(path).map_err(|e| TemplateError {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(&text)
        .map_err(|reason| TemplateError {
            path: path.display().to_string(),
            reason,
        })
        .map(|mut s| {
            s.origin = path.display().to_string();
            s
        })
}

/// Reads the settings from the template at `path` when it exists; the
/// defaults otherwise. A template that exists but cannot be read is an error.
pub fn load_or_default(path: &Path) -> Result<Settings, TemplateError> {
    if path.exists() {
        load(path)
    } else {
        Ok(Settings::default())
    }
}

/// The mappings of a template's text.
pub fn parse(text: &str) -> Result<Settings, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let doc = docs.first().ok_or("the template is empty")?;
    let resources = doc["Resources"]
        .as_hash()
        .ok_or("the template has no Resources")?;
    let mut settings = Settings::default();

    let stream = mapping_properties(resources, PUBLISH_EVENTS_FUNCTION, "DynamoDB")
        .ok_or("no DynamoDB stream event source mapping for PublishEventsFunction")?;
    let d = StreamMapping::default();
    settings.stream = StreamMapping {
        batch_size: int(stream, "BatchSize", 100)?,
        batching_window: Duration::from_secs(int(stream, "MaximumBatchingWindowInSeconds", 0)?),
        starting_position: stream["StartingPosition"]
            .as_str()
            .unwrap_or(&d.starting_position)
            .to_owned(),
        report_batch_item_failures: reports_failures(stream),
        bisect_on_function_error: stream["BisectBatchOnFunctionError"]
            .as_bool()
            .unwrap_or(false),
        maximum_retry_attempts: unbounded(stream, "MaximumRetryAttempts")?,
        maximum_record_age: unbounded(stream, "MaximumRecordAgeInSeconds")?
            .map(|s| Duration::from_secs(u64::from(s))),
    };

    let queue = mapping_properties(resources, SHIPPING_FUNCTION, "SQS")
        .ok_or("no SQS event source mapping for ShippingFunction")?;
    settings.queue = QueueMapping {
        batch_size: int(queue, "BatchSize", 10)?,
        batching_window: Duration::from_secs(int(queue, "MaximumBatchingWindowInSeconds", 0)?),
        report_batch_item_failures: reports_failures(queue),
    };

    let global: Option<u64> = match &doc["Globals"]["Function"]["Timeout"] {
        Yaml::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    };
    for name in [
        ORDERS_API_FUNCTION,
        PUBLISH_EVENTS_FUNCTION,
        SHIPPING_FUNCTION,
    ] {
        let Some(f) = resources.get(&Yaml::String(name.to_owned())) else {
            continue;
        };
        let own = match &f["Properties"]["Timeout"] {
            Yaml::Integer(i) => u64::try_from(*i).ok(),
            _ => None,
        };
        if let Some(secs) = own.or(global) {
            settings
                .timeouts
                .insert(name.to_owned(), Duration::from_secs(secs));
        }
    }

    if let Some(q) = resources.get(&Yaml::String(SHIPPING_QUEUE.to_owned())) {
        let props = &q["Properties"];
        settings.visibility_timeout = Duration::from_secs(int(props, "VisibilityTimeout", 30)?);
        let redrive = &props["RedrivePolicy"];
        if !redrive.is_badvalue() {
            settings.max_receive_count = int(redrive, "maxReceiveCount", 5)?;
        }
    }
    Ok(settings)
}

/// The properties of the event source mapping of kind `kind` (`DynamoDB`,
/// `SQS`) that invokes `function`: a SAM `Events` entry of the function, or
/// an `AWS::Lambda::EventSourceMapping` naming it.
fn mapping_properties<'a>(
    resources: &'a yaml_rust2::yaml::Hash,
    function: &str,
    kind: &str,
) -> Option<&'a Yaml> {
    if let Some(f) = resources.get(&Yaml::String(function.to_owned())) {
        if let Some(events) = f["Properties"]["Events"].as_hash() {
            for event in events.values() {
                if event["Type"].as_str() == Some(kind) {
                    return Some(&event["Properties"]);
                }
            }
        }
    }
    resources.values().find_map(|r| {
        let props = &r["Properties"];
        let is_mapping = r["Type"].as_str() == Some("AWS::Lambda::EventSourceMapping");
        (is_mapping && mentions(&props["FunctionName"], function)).then_some(props)
    })
}

/// Whether a value (`!Ref X`, `!GetAtt X.Arn`, a plain name) refers to `name`.
fn mentions(value: &Yaml, name: &str) -> bool {
    match value {
        Yaml::String(s) => s == name || s.starts_with(&format!("{name}.")),
        Yaml::Array(a) => a.iter().any(|v| mentions(v, name)),
        Yaml::Hash(h) => h.values().any(|v| mentions(v, name)),
        _ => false,
    }
}

fn reports_failures(props: &Yaml) -> bool {
    props["FunctionResponseTypes"].as_vec().is_some_and(|v| {
        v.iter()
            .any(|t| t.as_str() == Some("ReportBatchItemFailures"))
    })
}

fn int<T: TryFrom<i64>>(props: &Yaml, key: &str, default: T) -> Result<T, String> {
    match &props[key] {
        Yaml::BadValue | Yaml::Null => Ok(default),
        Yaml::Integer(i) => T::try_from(*i).map_err(|_| format!("{key}: {i} is out of range")),
        Yaml::String(s) => s
            .parse::<i64>()
            .ok()
            .and_then(|i| T::try_from(i).ok())
            .ok_or_else(|| format!("{key}: {s:?} is not a whole number the run can use")),
        other => Err(format!("{key}: {other:?} is not a whole number")),
    }
}

/// A limit where -1 means none.
fn unbounded(props: &Yaml, key: &str) -> Result<Option<u32>, String> {
    let v: i64 = int(props, key, -1)?;
    if v < 0 {
        Ok(None)
    } else {
        u32::try_from(v)
            .map(Some)
            .map_err(|_| format!("{key}: {v} is out of range"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAM: &str = r#"
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Resources:
  ShippingQueue:
    Type: AWS::SQS::Queue
    Properties:
      VisibilityTimeout: 60
      RedrivePolicy:
        deadLetterTargetArn: !GetAtt ShippingDeadLetterQueue.Arn
        maxReceiveCount: 5
  PublishEventsFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: .
      Events:
        Stream:
          Type: DynamoDB
          Properties:
            Stream: !GetAtt OutboxTable.StreamArn
            BatchSize: 100
            MaximumBatchingWindowInSeconds: 1
            StartingPosition: TRIM_HORIZON
            FunctionResponseTypes: [ReportBatchItemFailures]
            BisectBatchOnFunctionError: true
            MaximumRetryAttempts: 10
            MaximumRecordAgeInSeconds: 3600
            DestinationConfig:
              OnFailure:
                Destination: !GetAtt PublishEventsFailureQueue.Arn
  ShippingFunction:
    Type: AWS::Serverless::Function
    Properties:
      Timeout: 10
      Events:
        Queue:
          Type: SQS
          Properties:
            Queue: !GetAtt ShippingQueue.Arn
            BatchSize: 10
            FunctionResponseTypes:
              - ReportBatchItemFailures
"#;

    #[test]
    fn reads_sam_events_with_tags() {
        let s = parse(SAM).unwrap();
        let expected = Settings::default();
        assert_eq!(s.stream, expected.stream);
        assert_eq!(s.queue, expected.queue);
        assert_eq!(s.visibility_timeout, Duration::from_secs(60));
        assert_eq!(s.max_receive_count, 5);
        assert_eq!(
            s.timeout(SHIPPING_FUNCTION, Duration::ZERO),
            Duration::from_secs(10)
        );
        assert_eq!(
            s.timeout(PUBLISH_EVENTS_FUNCTION, Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn reads_plain_event_source_mappings() {
        let t = r#"
Resources:
  StreamMapping:
    Type: AWS::Lambda::EventSourceMapping
    Properties:
      FunctionName: !Ref PublishEventsFunction
      EventSourceArn: !GetAtt OutboxTable.StreamArn
      BatchSize: 50
      StartingPosition: LATEST
      MaximumRetryAttempts: -1
  QueueMapping:
    Type: AWS::Lambda::EventSourceMapping
    Properties:
      FunctionName: { "Fn::GetAtt": [ShippingFunction, Arn] }
      BatchSize: 5
  PublishEventsFunction: { Type: AWS::Serverless::Function, Properties: {} }
"#;
        let s = parse(t).unwrap();
        assert_eq!(s.stream.batch_size, 50);
        assert_eq!(s.stream.starting_position, "LATEST");
        assert_eq!(s.stream.maximum_retry_attempts, None);
        assert!(!s.stream.report_batch_item_failures);
        assert_eq!(s.queue.batch_size, 5);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert!(parse("Resources: {}")
            .unwrap_err()
            .contains("PublishEventsFunction"));
        assert!(parse(": : :").is_err());
        let bad = SAM.replace("BatchSize: 100", "BatchSize: many");
        assert!(parse(&bad).unwrap_err().contains("BatchSize"));
    }

    /// The built-in values are the template's, while both exist.
    #[test]
    fn defaults_match_the_template() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../infra/template.yaml");
        if !path.exists() {
            return;
        }
        let from_template = load(&path).unwrap();
        let defaults = Settings::default();
        assert_eq!(from_template.stream, defaults.stream);
        assert_eq!(from_template.queue, defaults.queue);
        assert_eq!(
            from_template.visibility_timeout,
            defaults.visibility_timeout
        );
        assert_eq!(from_template.max_receive_count, defaults.max_receive_count);
    }
}
