//! DynamoDB JSON (`{"S": ".."}`) turned into the SDKs' attribute values, so
//! the JSON fixtures and their mutations also feed the decoders that take
//! SDK types. Lenient on purpose: whatever JSON came out of a mutation
//! becomes some attribute value, however odd, never nothing.

use std::collections::HashMap;

use aws_smithy_types::Blob;
use serde_json::Value;

macro_rules! converter {
    ($value:ident, $image:ident, $($attr:ident)::+) => {
        /// One attribute value from its DynamoDB JSON.
        pub fn $value(v: &Value) -> $($attr)::+ {
            use $($attr)::+ as A;
            let text = |v: &Value| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let texts = |v: &Value| match v {
                Value::Array(a) => a.iter().map(text).collect(),
                other => vec![text(other)],
            };
            let blob = |v: &Value| Blob::new(text(v).into_bytes());
            let Some((tag, inner)) = v.as_object().and_then(|o| o.iter().next()) else {
                // Not a tagged value at all: a string (S) of its text.
                return A::S(text(v));
            };
            match tag.as_str() {
                "S" => A::S(text(inner)),
                "N" => A::N(text(inner)),
                "B" => A::B(blob(inner)),
                "BOOL" => A::Bool(inner.as_bool().unwrap_or(false)),
                "NULL" => A::Null(inner.as_bool().unwrap_or(true)),
                "SS" => A::Ss(texts(inner)),
                "NS" => A::Ns(texts(inner)),
                "BS" => A::Bs(match inner {
                    Value::Array(a) => a.iter().map(blob).collect(),
                    other => vec![blob(other)],
                }),
                "L" => A::L(match inner {
                    Value::Array(a) => a.iter().map($value).collect(),
                    other => vec![$value(other)],
                }),
                "M" => A::M($image(inner)),
                // An unknown tag: its raw bytes (B), the strangest type.
                _ => A::B(Blob::new(v.to_string().into_bytes())),
            }
        }

        /// An item or image (a map of attribute values) from its DynamoDB
        /// JSON; a non-object gives an empty image.
        pub fn $image(v: &Value) -> HashMap<String, $($attr)::+> {
            match v {
                Value::Object(o) => o.iter().map(|(k, v)| (k.clone(), $value(v))).collect(),
                _ => HashMap::new(),
            }
        }
    };
}

converter!(
    table_value,
    table_item,
    aws_sdk_dynamodb::types::AttributeValue
);
converter!(
    stream_value,
    stream_image,
    aws_sdk_dynamodbstreams::types::AttributeValue
);
