//! The event shapes Lambda hands functions, built from what the emulators
//! return: DynamoDB stream records, SQS messages, API Gateway HTTP API
//! (payload 2.0) requests and responses.

use std::collections::HashMap;

use aws_sdk_dynamodbstreams::types::{AttributeValue, Record};
use serde_json::{json, Map, Value};

/// A DynamoDB attribute value in DynamoDB JSON, as stream events carry it.
pub fn attribute_json(value: &AttributeValue) -> Value {
    use aws_smithy_types::base64::encode;
    match value {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::B(b) => json!({ "B": encode(b.as_ref()) }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::Null(b) => json!({ "NULL": b }),
        AttributeValue::Ss(v) => json!({ "SS": v }),
        AttributeValue::Ns(v) => json!({ "NS": v }),
        AttributeValue::Bs(v) => {
            json!({ "BS": v.iter().map(|b| encode(b.as_ref())).collect::<Vec<_>>() })
        }
        AttributeValue::L(v) => json!({ "L": v.iter().map(attribute_json).collect::<Vec<_>>() }),
        AttributeValue::M(m) => json!({ "M": image_json(m) }),
        // A kind newer than this SDK: passed on as nothing, which the
        // function reports as malformed rather than being misled.
        _ => Value::Null,
    }
}

/// An item image in DynamoDB JSON.
pub fn image_json(image: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        image
            .iter()
            .map(|(k, v)| (k.clone(), attribute_json(v)))
            .collect::<Map<_, _>>(),
    )
}

/// One Streams API record as a Lambda DynamoDB event record.
pub fn stream_record_json(record: &Record, stream_arn: &str, region: &str) -> Value {
    let mut data = Map::new();
    if let Some(d) = record.dynamodb() {
        if let Some(t) = d.approximate_creation_date_time() {
            data.insert(
                "ApproximateCreationDateTime".into(),
                json!(t.as_secs_f64().floor()),
            );
        }
        if let Some(keys) = d.keys.as_ref() {
            data.insert("Keys".into(), image_json(keys));
        }
        if let Some(new) = d.new_image.as_ref() {
            data.insert("NewImage".into(), image_json(new));
        }
        if let Some(old) = d.old_image.as_ref() {
            data.insert("OldImage".into(), image_json(old));
        }
        if let Some(seq) = d.sequence_number() {
            data.insert("SequenceNumber".into(), json!(seq));
        }
        if let Some(size) = d.size_bytes() {
            data.insert("SizeBytes".into(), json!(size));
        }
        if let Some(view) = d.stream_view_type() {
            data.insert("StreamViewType".into(), json!(view.as_str()));
        }
    }
    let mut out = json!({
        "eventID": record.event_id().unwrap_or_default(),
        "eventName": record.event_name().map(|n| n.as_str()).unwrap_or_default(),
        "eventVersion": record.event_version().unwrap_or("1.1"),
        "eventSource": "aws:dynamodb",
        "awsRegion": record.aws_region().unwrap_or(region),
        "dynamodb": Value::Object(data),
        "eventSourceARN": stream_arn,
    });
    if let Some(identity) = record.user_identity() {
        out["userIdentity"] = json!({
            "type": identity.r#type().unwrap_or_default(),
            "principalId": identity.principal_id().unwrap_or_default(),
        });
    }
    out
}

/// One received SQS message as a Lambda SQS event record.
pub fn sqs_record_json(
    message: &aws_sdk_sqs::types::Message,
    queue_arn: &str,
    region: &str,
) -> Value {
    let attributes: Map<String, Value> = message
        .attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
                .collect()
        })
        .unwrap_or_default();
    let message_attributes: Map<String, Value> = message
        .message_attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!({
                            "stringValue": v.string_value(),
                            "dataType": v.data_type(),
                            "stringListValues": [],
                            "binaryListValues": [],
                        }),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "messageId": message.message_id().unwrap_or_default(),
        "receiptHandle": message.receipt_handle().unwrap_or_default(),
        "body": message.body().unwrap_or_default(),
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": message.md5_of_body().unwrap_or_default(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    })
}

/// An HTTP request as API Gateway's HTTP API (payload format 2.0) hands it
/// to a Lambda integration on the `$default` route.
#[allow(clippy::too_many_arguments)]
pub fn http_api_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
    request_id: &str,
    source_ip: &str,
) -> Value {
    let mut header_map: Map<String, Value> = Map::new();
    let mut cookies = Vec::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if name == "cookie" {
            cookies.extend(value.split(';').map(|c| json!(c.trim())));
            continue;
        }
        // Repeated headers are joined with commas, as API Gateway does.
        match header_map.get_mut(&name) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(value);
            }
            _ => {
                header_map.insert(name, json!(value));
            }
        }
    }
    let user_agent = header_map
        .get("user-agent")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let now = chrono::Utc::now();
    let (body, base64) = match std::str::from_utf8(body) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => (aws_smithy_types::base64::encode(body), true),
    };
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": header_map,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": "127.0.0.1",
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": user_agent,
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": now.format("%d/%b/%Y:%H:%M:%S +0000").to_string(),
            "timeEpoch": now.timestamp_millis(),
        },
        "isBase64Encoded": base64,
    });
    if !cookies.is_empty() {
        event["cookies"] = Value::Array(cookies);
    }
    if !query.is_empty() {
        let params: Map<String, Value> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_owned(), json!(v)),
                None => (p.to_owned(), json!("")),
            })
            .collect();
        event["queryStringParameters"] = Value::Object(params);
    }
    if !body.is_empty() {
        event["body"] = json!(body);
    }
    event
}

/// What API Gateway makes of a function's payload 2.0 response.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpApiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Reads a function's answer to an HTTP API event. A response without
/// `statusCode` is, as API Gateway documents for payload 2.0, taken as a
/// 200 whose body is the JSON itself.
pub fn http_api_response(value: &Value) -> Result<HttpApiResponse, String> {
    let Some(object) = value.as_object().filter(|o| o.contains_key("statusCode")) else {
        return Ok(HttpApiResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        });
    };
    let status = object
        .get("statusCode")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("statusCode is not an HTTP status: {}", object["statusCode"]))?;
    let mut headers = Vec::new();
    if let Some(Value::Object(h)) = object.get("headers") {
        for (k, v) in h {
            if let Some(v) = v.as_str() {
                headers.push((k.clone(), v.to_owned()));
            }
        }
    }
    if let Some(Value::Object(h)) = object.get("multiValueHeaders") {
        for (k, values) in h {
            for v in values
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                headers.push((k.clone(), v.to_owned()));
            }
        }
    }
    if let Some(Value::Array(cookies)) = object.get("cookies") {
        for c in cookies.iter().filter_map(Value::as_str) {
            headers.push(("set-cookie".into(), c.to_owned()));
        }
    }
    let text = object.get("body").and_then(Value::as_str).unwrap_or("");
    let body = if object.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
        aws_smithy_types::base64::decode(text).map_err(|e| format!("body is not base64: {e}"))?
    } else {
        text.as_bytes().to_vec()
    };
    Ok(HttpApiResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_values_are_dynamodb_json() {
        let m = HashMap::from([
            ("a".to_owned(), AttributeValue::S("x".into())),
            (
                "b".to_owned(),
                AttributeValue::L(vec![AttributeValue::N("1".into())]),
            ),
            (
                "c".to_owned(),
                AttributeValue::B(aws_smithy_types::Blob::new(b"hi".to_vec())),
            ),
        ]);
        assert_eq!(
            image_json(&m),
            json!({"a": {"S": "x"}, "b": {"L": [{"N": "1"}]}, "c": {"B": "aGk="}})
        );
    }

    #[test]
    fn http_api_requests_have_the_v2_shape() {
        let e = http_api_request(
            "POST",
            "/orders/o-1/pay",
            "a=1&b",
            &[
                ("If-Match".into(), "1".into()),
                ("X-Dup".into(), "a".into()),
                ("x-dup".into(), "b".into()),
            ],
            b"{}",
            "r-1",
            "127.0.0.1",
        );
        assert_eq!(e["version"], "2.0");
        assert_eq!(e["requestContext"]["http"]["method"], "POST");
        assert_eq!(e["headers"]["if-match"], "1");
        assert_eq!(e["headers"]["x-dup"], "a,b");
        assert_eq!(e["queryStringParameters"], json!({"a": "1", "b": ""}));
        assert_eq!(e["body"], "{}");
        assert_eq!(e["isBase64Encoded"], false);
    }

    #[test]
    fn http_api_responses_decode() {
        let r = http_api_response(&json!({
            "statusCode": 201, "headers": {"content-type": "application/json"},
            "body": "eyJhIjoxfQ==", "isBase64Encoded": true
        }))
        .unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (201, br#"{"a":1}"#.as_slice())
        );
        let r = http_api_response(&json!({"orderId": "o"})).unwrap();
        assert_eq!(r.status, 200);
        assert!(http_api_response(&json!({"statusCode": 99})).is_err());
        assert!(http_api_response(&json!({"statusCode": "x"})).is_err());
    }
}
