//! How Lambda's event source mappings settle a batch, as pure logic the
//! pollers drive: partial batch responses, bisect on function error, retry
//! limits. Kept apart from the AWS calls so every rule has a unit test.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use serde_json::Value;

/// The DynamoDB stream mapping's settings (the template's
/// `AWS::Lambda::EventSourceMapping` / SAM `DynamoDB` event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMapping {
    pub batch_size: usize,
    pub batching_window: Duration,
    pub starting_position: String,
    pub report_batch_item_failures: bool,
    pub bisect_on_function_error: bool,
    /// `None` is Lambda's -1: retry until the records expire.
    pub maximum_retry_attempts: Option<u32>,
    /// `None` is Lambda's -1: records never expire here.
    pub maximum_record_age: Option<Duration>,
}

impl Default for StreamMapping {
    /// The values the template declares (see `orders-contract`), used when
    /// the template cannot be read.
    fn default() -> Self {
        Self {
            batch_size: 100,
            batching_window: Duration::from_secs(1),
            starting_position: "TRIM_HORIZON".to_owned(),
            report_batch_item_failures: true,
            bisect_on_function_error: true,
            maximum_retry_attempts: Some(10),
            maximum_record_age: Some(Duration::from_secs(3600)),
        }
    }
}

/// The SQS mapping's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMapping {
    pub batch_size: usize,
    pub batching_window: Duration,
    pub report_batch_item_failures: bool,
}

impl Default for QueueMapping {
    fn default() -> Self {
        Self {
            batch_size: 10,
            batching_window: Duration::ZERO,
            report_batch_item_failures: true,
        }
    }
}

/// What a function's response says about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every record is done.
    AllDone,
    /// The records from this index on are to be retried (a stream resumes
    /// from the lowest failed sequence number).
    RetryFrom(usize),
    /// These records (indexes) failed; the others are done (SQS).
    Failed(Vec<usize>),
    /// The whole batch failed: an identifier Lambda cannot match, or a
    /// response it cannot read.
    AllFailed,
}

/// The failed identifiers of a partial batch response, or `None` for a
/// response that reports the whole batch failed. A missing, null or empty
/// `batchItemFailures` means success, as Lambda reads it.
fn failed_identifiers(response: &Value) -> Option<Vec<String>> {
    let failures = match response.get("batchItemFailures") {
        None | Some(Value::Null) => return Some(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return None,
    };
    failures
        .iter()
        .map(|f| {
            f.get("itemIdentifier")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
        })
        .collect()
}

/// Reads a stream function's response for a batch whose records carry
/// `sequence_numbers`, in shard order.
pub fn stream_verdict(sequence_numbers: &[String], response: &Value, report: bool) -> Verdict {
    if !report {
        return Verdict::AllDone;
    }
    let Some(failed) = failed_identifiers(response) else {
        return Verdict::AllFailed;
    };
    if failed.is_empty() {
        return Verdict::AllDone;
    }
    let mut lowest = usize::MAX;
    for id in &failed {
        match sequence_numbers.iter().position(|s| s == id) {
            Some(i) => lowest = lowest.min(i),
            None => return Verdict::AllFailed,
        }
    }
    Verdict::RetryFrom(lowest)
}

/// Reads an SQS function's response for a batch of `message_ids`.
pub fn queue_verdict(message_ids: &[String], response: &Value, report: bool) -> Verdict {
    if !report {
        return Verdict::AllDone;
    }
    let Some(failed) = failed_identifiers(response) else {
        return Verdict::AllFailed;
    };
    if failed.is_empty() {
        return Verdict::AllDone;
    }
    let mut indexes = HashSet::new();
    for id in &failed {
        match message_ids.iter().position(|m| m == id) {
            Some(i) => {
                indexes.insert(i);
            }
            None => return Verdict::AllFailed,
        }
    }
    let mut indexes: Vec<usize> = indexes.into_iter().collect();
    indexes.sort_unstable();
    Verdict::Failed(indexes)
}

/// A part of a stream batch still to be delivered, and how often it failed.
#[derive(Debug, Clone, PartialEq)]
struct Part<T> {
    records: Vec<T>,
    attempts: u32,
}

/// What became of the part just invoked.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled<T> {
    /// Delivered; the shard's checkpoint moves past these many records.
    Done(usize),
    /// To be invoked again from the first failed record.
    Retry { from: usize },
    /// Split in two after a function error; the halves go in order.
    Bisected,
    /// Out of retries: these records go to the on-failure destination and
    /// the shard moves on.
    Discarded(Vec<T>),
}

/// One stream batch on its way through the function: the part to invoke
/// next, and what to do with the answer. Records stay in shard order: a
/// later part is never invoked before an earlier one is settled.
#[derive(Debug, Clone)]
pub struct StreamBatch<T> {
    parts: VecDeque<Part<T>>,
    mapping: StreamMapping,
}

impl<T: Clone> StreamBatch<T> {
    pub fn new(records: Vec<T>, mapping: &StreamMapping) -> Self {
        let mut parts = VecDeque::new();
        if !records.is_empty() {
            parts.push_back(Part {
                records,
                attempts: 0,
            });
        }
        Self {
            parts,
            mapping: mapping.clone(),
        }
    }

    /// The records to invoke the function with now; `None` once settled.
    pub fn next(&self) -> Option<&[T]> {
        self.parts.front().map(|p| p.records.as_slice())
    }

    /// Whether the current part's retries are used up after one more failure.
    fn exhausted(&self, attempts: u32) -> bool {
        self.mapping
            .maximum_retry_attempts
            .is_some_and(|max| attempts > max)
    }

    /// Settles the part returned by [`next`](Self::next) with the
    /// function's answer: a verdict on its response, or `None` for a
    /// function error (a handler error, a crash, a timeout).
    pub fn settle(&mut self, answer: Option<Verdict>) -> Settled<T> {
        let Some(mut part) = self.parts.pop_front() else {
            return Settled::Done(0);
        };
        let retry_from = match answer {
            Some(Verdict::AllDone) => return Settled::Done(part.records.len()),
            Some(Verdict::RetryFrom(i)) if i < part.records.len() => i,
            // Failed indexes are an SQS notion; on a stream the lowest counts.
            Some(Verdict::Failed(failed)) if !failed.is_empty() => {
                failed.into_iter().min().unwrap_or(0)
            }
            Some(Verdict::Failed(_)) => return Settled::Done(part.records.len()),
            Some(Verdict::RetryFrom(_)) | Some(Verdict::AllFailed) => 0,
            None => {
                part.attempts = part.attempts.saturating_add(1);
                if self.exhausted(part.attempts) {
                    return Settled::Discarded(part.records);
                }
                if self.mapping.bisect_on_function_error && part.records.len() > 1 {
                    let second = part.records.split_off(part.records.len() / 2);
                    let attempts = part.attempts;
                    self.parts.push_front(Part {
                        records: second,
                        attempts,
                    });
                    self.parts.push_front(part);
                    return Settled::Bisected;
                }
                self.parts.push_front(part);
                return Settled::Retry { from: 0 };
            }
        };
        // What was before the first failure is done; Lambda's checkpoint
        // moves to it and the rest is retried.
        let done = retry_from;
        part.records.drain(..retry_from);
        part.attempts = part.attempts.saturating_add(1);
        if self.exhausted(part.attempts) {
            return Settled::Discarded(part.records);
        }
        self.parts.push_front(part);
        if done > 0 {
            Settled::Retry { from: done }
        } else {
            Settled::Retry { from: 0 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seqs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{}", 1000 + i)).collect()
    }

    fn failures(ids: &[&str]) -> Value {
        json!({"batchItemFailures": ids.iter().map(|i| json!({"itemIdentifier": i})).collect::<Vec<_>>()})
    }

    #[test]
    fn stream_responses_resume_from_the_lowest_failure() {
        let s = seqs(5);
        assert_eq!(stream_verdict(&s, &json!({}), true), Verdict::AllDone);
        assert_eq!(stream_verdict(&s, &json!(null), true), Verdict::AllDone);
        assert_eq!(
            stream_verdict(&s, &json!({"batchItemFailures": []}), true),
            Verdict::AllDone
        );
        assert_eq!(
            stream_verdict(&s, &failures(&["1003", "1001"]), true),
            Verdict::RetryFrom(1)
        );
        // An identifier not in the batch, or an empty one: all failed.
        assert_eq!(
            stream_verdict(&s, &failures(&["9"]), true),
            Verdict::AllFailed
        );
        assert_eq!(
            stream_verdict(&s, &failures(&[""]), true),
            Verdict::AllFailed
        );
        assert_eq!(
            stream_verdict(&s, &json!({"batchItemFailures": "x"}), true),
            Verdict::AllFailed
        );
        // Without ReportBatchItemFailures the response is not read.
        assert_eq!(
            stream_verdict(&s, &failures(&["1001"]), false),
            Verdict::AllDone
        );
    }

    #[test]
    fn queue_responses_name_the_failed_messages() {
        let ids = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(
            queue_verdict(&ids, &failures(&["c", "a", "c"]), true),
            Verdict::Failed(vec![0, 2])
        );
        assert_eq!(
            queue_verdict(&ids, &failures(&["z"]), true),
            Verdict::AllFailed
        );
        assert_eq!(queue_verdict(&ids, &json!({}), true), Verdict::AllDone);
    }

    #[test]
    fn a_partial_failure_retries_the_rest_only() {
        let mut batch = StreamBatch::new((0..6).collect::<Vec<u32>>(), &StreamMapping::default());
        assert_eq!(batch.next(), Some(&[0, 1, 2, 3, 4, 5][..]));
        assert_eq!(
            batch.settle(Some(Verdict::RetryFrom(4))),
            Settled::Retry { from: 4 }
        );
        assert_eq!(batch.next(), Some(&[4, 5][..]));
        assert_eq!(batch.settle(Some(Verdict::AllDone)), Settled::Done(2));
        assert_eq!(batch.next(), None);
    }

    #[test]
    fn a_function_error_bisects_until_the_poison_record_is_alone() {
        let mapping = StreamMapping {
            maximum_retry_attempts: Some(10),
            ..StreamMapping::default()
        };
        let mut batch = StreamBatch::new((0..8).collect::<Vec<u32>>(), &mapping);
        let poison = 5;
        let mut delivered = Vec::new();
        let mut discarded = Vec::new();
        let mut invocations = 0;
        while let Some(part) = batch.next().map(<[u32]>::to_vec) {
            invocations += 1;
            let answer = if part.contains(&poison) {
                None
            } else {
                Some(Verdict::AllDone)
            };
            match batch.settle(answer) {
                Settled::Done(_) => delivered.extend(part),
                Settled::Discarded(r) => discarded.extend(r),
                Settled::Retry { .. } | Settled::Bisected => {}
            }
            assert!(invocations < 100);
        }
        // Everything but the poison record, in shard order.
        assert_eq!(delivered, vec![0, 1, 2, 3, 4, 6, 7]);
        assert_eq!(discarded, vec![5]);
        // 8 -> 4 -> 2 -> 1 takes three failures; the lone record then
        // fails until its eleventh failure (ten retries) exhausts it.
        assert_eq!(invocations, 1 + 1 + 1 + 1 + 3 + 7);
    }

    #[test]
    fn retries_are_bounded_and_unbounded_when_asked() {
        let mapping = StreamMapping {
            maximum_retry_attempts: Some(2),
            bisect_on_function_error: false,
            ..StreamMapping::default()
        };
        let mut batch = StreamBatch::new(vec!['a', 'b'], &mapping);
        assert_eq!(batch.settle(None), Settled::Retry { from: 0 });
        assert_eq!(
            batch.settle(Some(Verdict::AllFailed)),
            Settled::Retry { from: 0 }
        );
        assert_eq!(batch.settle(None), Settled::Discarded(vec!['a', 'b']));
        assert_eq!(batch.next(), None);

        let forever = StreamMapping {
            maximum_retry_attempts: None,
            bisect_on_function_error: false,
            ..StreamMapping::default()
        };
        let mut batch = StreamBatch::new(vec![1], &forever);
        for _ in 0..1000 {
            assert_eq!(batch.settle(None), Settled::Retry { from: 0 });
        }
    }

    #[test]
    fn partial_failures_count_against_the_retry_limit() {
        let mapping = StreamMapping {
            maximum_retry_attempts: Some(1),
            ..StreamMapping::default()
        };
        let mut batch = StreamBatch::new(vec![1, 2, 3], &mapping);
        assert_eq!(
            batch.settle(Some(Verdict::RetryFrom(1))),
            Settled::Retry { from: 1 }
        );
        assert_eq!(
            batch.settle(Some(Verdict::RetryFrom(1))),
            Settled::Discarded(vec![3])
        );
    }
}
