//! DynamoDB's service limits, checked before any network call, and the item
//! size rules they are measured with.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};

/// "TransactWriteItems is a synchronous write operation that groups up to 100
/// action requests" (DynamoDB API reference, `TransactWriteItems`).
pub const MAX_TRANSACTION_ACTIONS: usize = 100;

/// "The aggregate size of the items in the transaction cannot exceed 4 MB"
/// (DynamoDB API reference, `TransactWriteItems`).
pub const MAX_TRANSACTION_BYTES: usize = 4 * 1024 * 1024;

/// "The maximum item size in DynamoDB is 400 KB, which includes both attribute
/// name binary length (UTF-8 length) and attribute value lengths" (DynamoDB
/// developer guide, "Service, account, and table quotas").
pub const MAX_ITEM_BYTES: usize = 400 * 1024;

/// The limits a transaction is checked against; the defaults are DynamoDB's.
/// Lower them to leave room, raise them only if AWS raises its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_actions: usize,
    pub max_transaction_bytes: usize,
    pub max_item_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_actions: MAX_TRANSACTION_ACTIONS,
            max_transaction_bytes: MAX_TRANSACTION_BYTES,
            max_item_bytes: MAX_ITEM_BYTES,
        }
    }
}

impl Limits {
    pub fn max_actions(mut self, n: usize) -> Self {
        self.max_actions = n;
        self
    }

    pub fn max_transaction_bytes(mut self, n: usize) -> Self {
        self.max_transaction_bytes = n;
        self
    }

    pub fn max_item_bytes(mut self, n: usize) -> Self {
        self.max_item_bytes = n;
        self
    }
}

/// The size DynamoDB counts for an item: for each attribute, the UTF-8 length
/// of its name plus the size of its value (developer guide, "DynamoDB item
/// sizes and formats").
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

/// The size of one value, by the developer guide's rules: strings their UTF-8
/// bytes, numbers one byte per two significant digits plus one, binaries their
/// raw bytes, null and boolean one byte, lists and maps 3 bytes plus one per
/// element plus the elements (map keys counted like attribute names).
pub fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number_size(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| number_size(n)).sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(list) => 3 + list.iter().map(|v| 1 + value_size(v)).sum::<usize>(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| 1 + k.len() + value_size(v))
                .sum::<usize>()
        }
        // A kind this SDK does not know yet: count its debug text, an overestimate.
        other => format!("{other:?}").len(),
    }
}

fn number_size(n: &str) -> usize {
    let unsigned = n.trim_start_matches(['-', '+']);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = whole
        .chars()
        .chain(fraction.chars())
        .filter(char::is_ascii_digit)
        .collect();
    let digits = digits.trim_start_matches('0');
    let significant = digits.trim_end_matches('0');
    if significant.is_empty() {
        return 1;
    }
    // The number is `significant` x 10^low. DynamoDB stores digits in
    // pairs aligned on the decimal point (base 100), so a digit alone in
    // its pair at either end still takes a byte: 120 is two pairs (1|20),
    // not one and a half.
    let trailing = (digits.len() - significant.len()) as i64;
    let low = exponent
        .saturating_sub(fraction.len() as i64)
        .saturating_add(trailing);
    let high = low.saturating_add(significant.len() as i64 - 1);
    let pairs = high.div_euclid(2) - low.div_euclid(2) + 1;
    usize::try_from(pairs)
        .unwrap_or(usize::MAX)
        .saturating_add(1)
}

/// The bytes one action of a transaction counts for: the whole item for a
/// `Put`; for the others, what the request carries (key and expression
/// values), since the stored item is not known before the write.
pub fn action_size(item: &TransactWriteItem) -> usize {
    let values = |v: Option<&HashMap<String, AttributeValue>>| v.map(item_size).unwrap_or(0);
    if let Some(put) = item.put() {
        return item_size(put.item());
    }
    if let Some(update) = item.update() {
        return item_size(update.key()) + values(update.expression_attribute_values());
    }
    if let Some(delete) = item.delete() {
        return item_size(delete.key()) + values(delete.expression_attribute_values());
    }
    if let Some(check) = item.condition_check() {
        return item_size(check.key()) + values(check.expression_attribute_values());
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_documented_rules() {
        assert_eq!(number_size("0"), 1);
        assert_eq!(number_size("12345"), 4);
        assert_eq!(number_size("-1200"), 2);
        assert_eq!(number_size("0.0012"), 2);
        // Pairs are aligned on the decimal point: a lone digit at either
        // end takes a byte of its own.
        assert_eq!(number_size("120"), 3);
        assert_eq!(number_size("1795339212340"), 8);
        assert_eq!(number_size("1795339212345"), 8);
        assert_eq!(number_size("1.5e3"), 2);
        assert_eq!(number_size("1.5e4"), 3);
        let item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("Order#1".into())),
            (
                "l".to_owned(),
                AttributeValue::L(vec![AttributeValue::S("ab".into())]),
            ),
        ]);
        assert_eq!(item_size(&item), 2 + 7 + 1 + (3 + 1 + 2));
    }
}
