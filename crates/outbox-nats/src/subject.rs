//! Subjects from a template: `events.{aggregatetype}.{type}` by default.

use outbox_core::Event;

use crate::error::NatsError;

/// The template used when none is given.
pub const DEFAULT_SUBJECT_TEMPLATE: &str = "events.{aggregatetype}.{type}";

/// A placeholder of a template, filled from the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    AggregateType,
    EventType,
    AggregateId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// The subject an event is published to, built from a template of
/// dot-separated tokens. A token may hold the placeholders
/// `{aggregatetype}`, `{type}` (the event type) and `{aggregateid}`, alone or
/// with text around them.
///
/// NATS subjects cannot carry spaces, and `.`, `*` and `>` have a meaning of
/// their own, so each of these (and any control character) in a filled-in
/// value becomes `_`: an event type `order.created` stays one token.
///
/// ```
/// use outbox_nats::SubjectTemplate;
/// let t = SubjectTemplate::parse("shop.{aggregatetype}.{type}").unwrap();
/// assert_eq!(t.wildcard(), "shop.*.*");
/// assert!(SubjectTemplate::parse("shop.>").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    template: String,
    tokens: Vec<Vec<Part>>,
}

impl Default for SubjectTemplate {
    fn default() -> Self {
        // The default template is well-formed.
        Self::parse(DEFAULT_SUBJECT_TEMPLATE).unwrap_or_else(|_| Self {
            template: String::new(),
            tokens: Vec::new(),
        })
    }
}

impl SubjectTemplate {
    /// Parses a template, refusing empty tokens, wildcards, whitespace and
    /// unknown placeholders.
    pub fn parse(template: &str) -> Result<Self, NatsError> {
        let bad = |why: String| NatsError::Config(format!("subject template `{template}`: {why}"));
        let mut tokens = Vec::new();
        for token in template.split('.') {
            if token.is_empty() {
                return Err(bad("has an empty token".into()));
            }
            let mut parts = Vec::new();
            let mut rest = token;
            while let Some(open) = rest.find('{') {
                if open > 0 {
                    parts.push(Part::Text(rest[..open].to_owned()));
                }
                let Some(close) = rest[open..].find('}') else {
                    return Err(bad("has a `{` without `}`".into()));
                };
                let name = &rest[open + 1..open + close];
                parts.push(Part::Field(match name {
                    "aggregatetype" => Field::AggregateType,
                    "type" => Field::EventType,
                    "aggregateid" => Field::AggregateId,
                    other => {
                        return Err(bad(format!(
                            "unknown placeholder `{{{other}}}` (known: {{aggregatetype}}, {{type}}, {{aggregateid}})"
                        )))
                    }
                }));
                rest = &rest[open + close + 1..];
            }
            if !rest.is_empty() {
                parts.push(Part::Text(rest.to_owned()));
            }
            for part in &parts {
                if let Part::Text(text) = part {
                    if text.chars().any(|c| !allowed(c) || c == '}') {
                        return Err(bad(format!(
                            "token `{token}` has a wildcard, a space or a brace"
                        )));
                    }
                }
            }
            tokens.push(parts);
        }
        Ok(Self {
            template: template.to_owned(),
            tokens,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The subject of `event`.
    pub fn render(&self, event: &Event) -> String {
        let mut subject = String::with_capacity(self.template.len() + 32);
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                subject.push('.');
            }
            let start = subject.len();
            for part in token {
                match part {
                    Part::Text(text) => subject.push_str(text),
                    Part::Field(field) => {
                        let value = match field {
                            Field::AggregateType => &event.aggregate_type,
                            Field::EventType => &event.event_type,
                            Field::AggregateId => &event.aggregate_id,
                        };
                        subject.extend(value.chars().map(|c| if allowed(c) { c } else { '_' }));
                    }
                }
            }
            // An empty value still makes a token.
            if subject.len() == start {
                subject.push('_');
            }
        }
        subject
    }

    /// The subject filter matching every subject of the template: each
    /// token with a placeholder becomes `*`. A stream is created with it.
    pub fn wildcard(&self) -> String {
        self.tokens
            .iter()
            .map(|token| match token.as_slice() {
                [Part::Text(text)] => text.as_str(),
                _ => "*",
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// Whether `c` may stand in a subject token as is.
fn allowed(c: char) -> bool {
    !(c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control())
}

/// Whether the subject filter `filter` matches every subject that `pattern`
/// (tokens and `*` wildcards, as made by [`SubjectTemplate::wildcard`]) does.
pub fn covers(filter: &str, pattern: &str) -> bool {
    let filter: Vec<&str> = filter.split('.').collect();
    let pattern: Vec<&str> = pattern.split('.').collect();
    for (i, f) in filter.iter().enumerate() {
        if *f == ">" {
            // `>` matches one or more remaining tokens.
            return pattern.len() > i;
        }
        let Some(p) = pattern.get(i) else {
            return false;
        };
        if *f != "*" && (f != p || *p == "*") {
            return false;
        }
    }
    filter.len() == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(aggregate_type: &str, id: &str, ty: &str) -> Event {
        Event::builder(aggregate_type, id, 1, ty).build().unwrap()
    }

    #[test]
    fn renders_and_sanitizes_tokens() {
        let t = SubjectTemplate::default();
        assert_eq!(
            t.render(&event("Order", "o-1", "OrderCreated")),
            "events.Order.OrderCreated"
        );
        assert_eq!(
            t.render(&event("Order Line", "o-1", "order.created>*")),
            "events.Order_Line.order_created__"
        );
        let t = SubjectTemplate::parse("shop.{aggregatetype}-v1.{aggregateid}").unwrap();
        assert_eq!(t.render(&event("Order", "a.b", "X")), "shop.Order-v1.a_b");
        assert_eq!(t.wildcard(), "shop.*.*");
    }

    #[test]
    fn refuses_bad_templates() {
        for bad in [
            "",
            "a..b",
            "a.*",
            "a.>",
            "a b.{type}",
            "a.{nope}",
            "a.{type",
            "a.}",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn coverage_of_filters() {
        assert!(covers("events.>", "events.*.*"));
        assert!(covers(">", "events.*.*"));
        assert!(covers("events.*.*", "events.*.*"));
        assert!(covers("events.*.*", "events.Order.*"));
        assert!(!covers("events.Order.*", "events.*.*"));
        assert!(!covers("events.*", "events.*.*"));
        assert!(!covers("events.*.*.>", "events.*.*"));
        assert!(!covers("other.>", "events.*.*"));
    }
}
