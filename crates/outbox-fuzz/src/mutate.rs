//! Input generators: structure-aware mutations of JSON documents (the real
//! fixtures), text and byte mutations, and random bytes.
//!
//! Every generator draws from one [`Rng`] seeded per input, so an input is
//! rebuilt exactly from the run's seed and its index.

use fastrand::Rng;
use serde_json::{Map, Number, Value};

/// Marks an object key to be written twice (see [`to_text`]): serde_json's
/// map cannot hold a duplicate, the text can.
const DUPLICATE_MARK: &str = "\u{0}dup\u{0}";

/// Strings that trip parsers and validators: empty, blank, control and
/// separator characters, odd Unicode, lookalikes of numbers, ids and times.
pub const ODD_STRINGS: &[&str] = &[
    "",
    " ",
    "\t\n",
    "\u{0}",
    "a\u{0}b",
    "\u{7f}",
    "\u{1b}[31m",
    "#",
    "Order#o-1",
    "##",
    "\u{202e}reversed",
    "\u{feff}",
    "\u{fffd}",
    "\u{10ffff}",
    "é",
    "e\u{301}",
    "🦀",
    "\"",
    "\\",
    "\\u0000",
    "{",
    "}",
    "[]",
    "{}",
    "null",
    "true",
    "0",
    "-0",
    "01",
    "1e3",
    "1E400",
    "-1",
    "+1",
    " 1",
    "1 ",
    "0x10",
    "1_000",
    "١٢",
    "NaN",
    "Infinity",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "019aaa52-0000-7000-8000-00000000000",
    "019aaa52-0000-7000-8000-0000000000001",
    "019aaa5200007000800000000000001",
    "{019aaa52-0000-7000-8000-000000000001}",
    "urn:uuid:019aaa52-0000-7000-8000-000000000001",
    "2026-11-22T09:20:00Z",
    "2026-11-22T09:20:00.123456789Z",
    "2026-11-22T09:20:00+14:00",
    "2026-11-22 09:20:00",
    "2026-02-30T00:00:00Z",
    "2026-12-31T23:59:60Z",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "+262142-12-31T23:59:59Z",
    "-262143-01-01T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "INSERT",
    "MODIFY",
    "REMOVE",
    "insert",
    "Notification",
    "SubscriptionConfirmation",
    "1.0",
    "0.3",
    "1.00",
    "S",
    "N",
    "L",
    "M",
    "B",
    "NULL",
    "BOOL",
];

/// Numbers at and past the edges of every integer and float type.
pub fn odd_number(rng: &mut Rng) -> Value {
    let text = match rng.usize(..16) {
        0 => "0",
        1 => "-1",
        2 => "1",
        3 => "9223372036854775807",
        4 => "9223372036854775808",
        5 => "18446744073709551615",
        6 => "18446744073709551616",
        7 => "-9223372036854775808",
        8 => "-9223372036854775809",
        9 => "1.5",
        10 => "1e308",
        11 => "-0.0",
        12 => "4294967295",
        13 => "4294967296",
        14 => "2.0",
        _ => return Value::from(rng.i64(..)),
    };
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// A string from the odd list, a random one, or one of `known` (strings
/// found in the seeds, so fields get each other's values).
pub fn odd_string(rng: &mut Rng, known: &[String]) -> String {
    match rng.usize(..10) {
        0..=3 => ODD_STRINGS[rng.usize(..ODD_STRINGS.len())].to_owned(),
        4 | 5 if !known.is_empty() => known[rng.usize(..known.len())].clone(),
        6 => {
            let len = rng.usize(..40);
            random_text(rng, len)
        }
        7 => "x".repeat(huge_len(rng)),
        8 => {
            // Near the envelope's name limit, in bytes.
            let n = [255, 256, 257, 1023, 1024, 1025][rng.usize(..6)];
            "a".repeat(n)
        }
        _ => ODD_STRINGS[rng.usize(..ODD_STRINGS.len())].repeat(rng.usize(1..4)),
    }
}

/// Sizes past the usual limits (256 KiB messages, 400 KB items) but kept
/// small enough for a million inputs.
fn huge_len(rng: &mut Rng) -> usize {
    // The largest ones rarely: they cost the most time per input.
    if rng.usize(..20) == 0 {
        [70_000, 262_145, 300_000][rng.usize(..3)]
    } else {
        [1_000, 4_096][rng.usize(..2)]
    }
}

/// Any Unicode text (valid UTF-8, any characters).
pub fn random_text(rng: &mut Rng, len: usize) -> String {
    (0..len)
        .map(|_| match rng.usize(..4) {
            0 => rng.char(..),
            1 => rng.char('\u{0}'..'\u{20}'),
            _ => rng.alphanumeric(),
        })
        .collect()
}

/// A value of another JSON type than `v`, or an odd one of the same.
fn retyped(rng: &mut Rng, v: &Value, known: &[String]) -> Value {
    loop {
        let new = match rng.usize(..8) {
            0 => Value::Null,
            1 => Value::Bool(rng.bool()),
            2 => odd_number(rng),
            3 => Value::String(odd_string(rng, known)),
            4 => Value::Array(vec![]),
            5 => Value::Object(Map::new()),
            6 => Value::Array(vec![v.clone()]),
            _ => match v {
                // A number written as a string, a string as a number.
                Value::Number(n) => Value::String(n.to_string()),
                Value::String(s) => s
                    .parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map_or(Value::Null, Value::Number),
                _ => Value::String(v.to_string()),
            },
        };
        if std::mem::discriminant(&new) != std::mem::discriminant(v) || rng.bool() {
            return new;
        }
    }
}

/// How many nodes `v` has (itself included).
fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// The `n`th node of `v` in pre-order (counting down `n`).
fn nth<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
    if *n == 0 {
        return Some(v);
    }
    *n -= 1;
    match v {
        Value::Array(a) => a.iter_mut().find_map(|c| nth(c, n)),
        Value::Object(o) => o.values_mut().find_map(|c| nth(c, n)),
        _ => None,
    }
}

/// Every string value in `v`, to trade between fields.
pub fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            if s.len() < 200 {
                out.push(s.clone());
            }
            // Strings holding JSON (an event in an item, a message in a
            // notification) give theirs too.
            if s.starts_with('{') {
                if let Ok(inner) = serde_json::from_str::<Value>(s) {
                    strings(&inner, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| strings(c, out)),
        Value::Object(o) => {
            for (k, c) in o {
                out.push(k.clone());
                strings(c, out);
            }
        }
        _ => {}
    }
}

/// Applies one to `max` structural mutations to `doc`.
pub fn mutate_json(rng: &mut Rng, doc: &mut Value, known: &[String], max: usize) {
    for _ in 0..rng.usize(1..=max.max(1)) {
        mutate_once(rng, doc, known, 0);
    }
}

fn mutate_once(rng: &mut Rng, doc: &mut Value, known: &[String], depth: usize) {
    let nodes = count(doc);
    let kind = rng.usize(..14);
    if kind == 12 {
        // Copy one node over another.
        let from = nth(doc, &mut rng.usize(..nodes)).cloned();
        if let (Some(from), Some(to)) = (from, nth(doc, &mut rng.usize(..nodes))) {
            if count(&from) < 10_000 {
                *to = from;
            }
        }
        return;
    }
    let Some(node) = nth(doc, &mut rng.usize(..nodes)) else {
        return;
    };
    match kind {
        // Drop a member or an element.
        0 | 1 => match node {
            Value::Object(o) if !o.is_empty() => {
                let key = o.keys().nth(rng.usize(..o.len())).cloned();
                if let Some(key) = key {
                    o.remove(&key);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                a.remove(rng.usize(..a.len()));
            }
            _ => *node = Value::Null,
        },
        // Retype.
        2 | 3 => *node = retyped(rng, node, known),
        // Duplicate a member (written twice) or an element.
        4 => match node {
            Value::Object(o) if !o.is_empty() => {
                let key = o.keys().nth(rng.usize(..o.len())).cloned();
                if let Some(key) = key {
                    let twin = if rng.bool() {
                        o.get(&key).cloned().unwrap_or(Value::Null)
                    } else {
                        retyped(rng, &Value::Null, known)
                    };
                    o.insert(format!("{DUPLICATE_MARK}{key}"), twin);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.usize(..a.len());
                let copy = a[i].clone();
                a.insert(rng.usize(..=a.len()), copy);
            }
            _ => {}
        },
        // Odd scalars.
        5 => *node = odd_number(rng),
        6 => *node = Value::String(odd_string(rng, known)),
        // Mutate text inside a string, or the JSON a string holds.
        7 | 8 => {
            if let Value::String(s) = node {
                *s = mutate_string(rng, s, known, depth);
            } else {
                *node = Value::String(odd_string(rng, known));
            }
        }
        // Add an unknown or a known member.
        9 => {
            if let Value::Object(o) = node {
                let key = if rng.bool() && !known.is_empty() {
                    known[rng.usize(..known.len())].clone()
                } else {
                    odd_string(rng, known)
                };
                o.insert(key, retyped(rng, &Value::Null, known));
            } else if let Value::Array(a) = node {
                a.push(retyped(rng, &Value::Null, known));
            }
        }
        // Nest deeper.
        10 => {
            let depth = [2, 10, 127, 128, 129, 200][rng.usize(..6)];
            let mut v = std::mem::take(node);
            for _ in 0..depth {
                v = if rng.bool() {
                    Value::Array(vec![v])
                } else {
                    Value::Object(Map::from_iter([("a".to_owned(), v)]))
                };
            }
            *node = v;
        }
        // Huge arrays and objects.
        11 => {
            let item = std::mem::take(node);
            // Ten thousand copies of a scalar, a hundred of anything bigger:
            // wide enough to matter, small enough for a million inputs.
            let n = if count(&item) == 1 && rng.usize(..4) == 0 {
                10_000
            } else {
                100
            };
            // At most about a megabyte in all.
            let n = n
                .min(MAX_INPUT_BYTES / item.to_string().len().max(1))
                .max(1);
            *node = if rng.bool() {
                Value::Array(vec![item; n])
            } else {
                Value::Object((0..n).map(|i| (format!("k{i}"), item.clone())).collect())
            };
        }
        // Shuffle.
        13 if node.is_array() => {
            if let Value::Array(a) = node {
                rng.shuffle(a);
            }
        }
        // Empty it.
        _ => {
            *node = match node {
                Value::Array(_) => Value::Array(vec![]),
                Value::Object(_) => Value::Object(Map::new()),
                Value::String(_) => Value::String(String::new()),
                _ => Value::Null,
            }
        }
    }
}

/// A mutated string: when it holds JSON, usually that JSON mutated (so the
/// events inside an item, the CloudEvent inside a notification, are reached).
pub fn mutate_string(rng: &mut Rng, s: &str, known: &[String], depth: usize) -> String {
    if depth < 3 && rng.usize(..10) < 7 {
        if let Ok(mut inner) = serde_json::from_str::<Value>(s) {
            if inner.is_object() || inner.is_array() {
                mutate_json_at(rng, &mut inner, known, depth + 1);
                return to_text(&inner);
            }
        }
    }
    match rng.usize(..6) {
        0 => {
            // Cut it short.
            let cut = rng.usize(..=s.chars().count());
            s.chars().take(cut).collect()
        }
        1 => format!("{s}{}", odd_string(rng, known)),
        2 => format!("{}{s}", odd_string(rng, known)),
        3 => {
            let mut chars: Vec<char> = s.chars().collect();
            if !chars.is_empty() {
                let i = rng.usize(..chars.len());
                chars[i] = rng.char(..);
            }
            chars.into_iter().collect()
        }
        4 => s.repeat(rng.usize(2..5)),
        _ => odd_string(rng, known),
    }
}

fn mutate_json_at(rng: &mut Rng, doc: &mut Value, known: &[String], depth: usize) {
    for _ in 0..rng.usize(1..=3) {
        mutate_once(rng, doc, known, depth);
    }
}

/// `v` as JSON text, members marked by a duplication written twice.
pub fn to_text(v: &Value) -> String {
    let text = v.to_string();
    // serde_json writes U+0000 as `\u0000`.
    let escaped_mark = DUPLICATE_MARK.replace('\u{0}', "\\u0000");
    text.replace(&escaped_mark, "")
}

/// Byte-level damage: what a broken writer, a truncated read or a foreign
/// encoding gives.
pub fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, others: &[&[u8]]) {
    for _ in 0..rng.usize(1..=4) {
        let len = bytes.len();
        match rng.usize(..11) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                bytes[i] ^= 1 << rng.u32(..8);
            }
            1 if len > 0 => {
                let i = rng.usize(..len);
                bytes[i] = rng.u8(..);
            }
            2 => {
                // Invalid UTF-8: a lone continuation byte, a truncated or
                // overlong sequence, an encoded surrogate, bytes never valid.
                let bad: &[&[u8]] = &[
                    b"\x80",
                    b"\xc3",
                    b"\xc3\x28",
                    b"\xc0\xaf",
                    b"\xed\xa0\x80",
                    b"\xf4\x90\x80\x80",
                    b"\xff",
                    b"\xfe\xff",
                    b"\xe2\x82",
                ];
                let at = rng.usize(..=len);
                let insert = bad[rng.usize(..bad.len())];
                bytes.splice(at..at, insert.iter().copied());
            }
            3 => {
                // JSON escapes that are not Unicode scalar values.
                let bad: &[&[u8]] = &[b"\\ud800", b"\\udc00", b"\\ud800\\u0041", b"\\u", b"\\x41"];
                let at = rng.usize(..=len);
                let insert = bad[rng.usize(..bad.len())];
                bytes.splice(at..at, insert.iter().copied());
            }
            4 if len > 0 => bytes.truncate(rng.usize(..len)),
            5 if len > 0 => {
                let start = rng.usize(..len);
                let end = rng.usize(start..=len.min(start + 64));
                bytes.drain(start..end);
            }
            6 if len > 0 => {
                let start = rng.usize(..len);
                let end = rng.usize(start..=len.min(start + 64));
                let chunk = bytes[start..end].to_vec();
                let at = rng.usize(..=len);
                bytes.splice(at..at, chunk);
            }
            7 if !others.is_empty() => {
                // Splice in part of another seed.
                let other = others[rng.usize(..others.len())];
                if !other.is_empty() {
                    let start = rng.usize(..other.len());
                    let end = rng.usize(start..=other.len());
                    let at = rng.usize(..=len);
                    bytes.splice(at..at, other[start..end].iter().copied());
                }
            }
            8 => {
                let at = rng.usize(..=len);
                let tokens: &[&[u8]] = &[
                    b"{", b"}", b"[", b"]", b",", b":", b"\"", b"null", b"-", b"e", b"0", b" ",
                    b"\x00", b"1e99999", b"-0",
                ];
                let t = tokens[rng.usize(..tokens.len())];
                bytes.splice(at..at, t.iter().copied());
            }
            9 => {
                // Deep nesting past every recursion limit.
                let depth = [129, 1_000, 100_000][rng.usize(..3)];
                let at = rng.usize(..=len);
                let open = if rng.bool() { b'[' } else { b'{' };
                let nest = std::iter::repeat_n(open, depth);
                bytes.splice(at..at, nest);
            }
            _ => {
                let at = rng.usize(..=len);
                let n = rng.usize(1..16);
                let noise: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                bytes.splice(at..at, noise);
            }
        }
    }
}

/// Bytes with no structure at all, sometimes from the JSON alphabet.
pub fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    let len = rng.usize(..300);
    if rng.bool() {
        (0..len).map(|_| rng.u8(..)).collect()
    } else {
        let alphabet = b"{}[]\":,0123456789.eE+-truefalsnl SNLMB\\u";
        (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect()
    }
}

/// The largest input generated: the largest message SQS takes (1 MiB);
/// SNS and EventBridge take 256 KiB, a Lambda invocation 6 MB.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;

/// The usual mix for a decoder of JSON text: mostly structure-aware
/// mutations of a seed, some with byte damage on top, some raw bytes.
pub fn json_input(
    rng: &mut Rng,
    seeds: &[Value],
    seed_texts: &[&[u8]],
    known: &[String],
) -> Vec<u8> {
    let pick = rng.usize(..seeds.len().max(1));
    let mut bytes = match rng.usize(..20) {
        // A seed untouched: the accepted path must keep working.
        0 => seed_texts.get(pick).map(|s| s.to_vec()).unwrap_or_default(),
        1 | 2 => random_bytes(rng),
        3..=5 => {
            let mut bytes = seed_texts.get(pick).map(|s| s.to_vec()).unwrap_or_default();
            mutate_bytes(rng, &mut bytes, seed_texts);
            bytes
        }
        n => {
            let mut doc = seeds.get(pick).cloned().unwrap_or(Value::Null);
            mutate_json(rng, &mut doc, known, 4);
            let mut bytes = to_text(&doc).into_bytes();
            if n >= 17 {
                mutate_bytes(rng, &mut bytes, seed_texts);
            }
            bytes
        }
    };
    bytes.truncate(MAX_INPUT_BYTES);
    bytes
}
