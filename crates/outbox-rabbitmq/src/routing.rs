//! Routing keys: the event type, or a template.

use outbox_core::Event;

use crate::error::RabbitError;

/// The routing key of an event's message: the event type by default, or a
/// template with the placeholders `{aggregatetype}`, `{type}` and
/// `{aggregateid}` (`"{aggregatetype}.{type}"` lets topic bindings such as
/// `Order.*` pick an aggregate's events).
///
/// ```
/// use outbox_rabbitmq::RoutingKey;
/// let key = RoutingKey::template("{aggregatetype}.{type}").unwrap();
/// let event = outbox_core::Event::builder("Order", "o-1", 1, "OrderPlaced").build().unwrap();
/// assert_eq!(key.render(&event), "Order.OrderPlaced");
/// assert_eq!(RoutingKey::default().render(&event), "OrderPlaced");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKey {
    template: String,
}

impl Default for RoutingKey {
    fn default() -> Self {
        Self {
            template: "{type}".to_owned(),
        }
    }
}

impl RoutingKey {
    /// A template; unknown or unclosed placeholders are refused.
    pub fn template(template: &str) -> Result<Self, RabbitError> {
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                return Err(RabbitError::Config(format!(
                    "routing key template `{template}` has a `{{` without `}}`"
                )));
            };
            let name = &rest[open + 1..open + close];
            if !matches!(name, "aggregatetype" | "type" | "aggregateid") {
                return Err(RabbitError::Config(format!(
                    "routing key template `{template}`: unknown placeholder `{{{name}}}` \
                     (known: {{aggregatetype}}, {{type}}, {{aggregateid}})"
                )));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(Self {
            template: template.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The routing key of `event`. Values are inserted as they are: a
    /// placeholder inside a value is not expanded again.
    pub fn render(&self, event: &Event) -> String {
        let mut out = String::with_capacity(self.template.len() + 32);
        let mut rest = self.template.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            // `template` checked that every `{` is closed by a known name.
            let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
            out.push_str(match &rest[open + 1..close] {
                "aggregatetype" => &event.aggregate_type,
                "aggregateid" => &event.aggregate_id,
                _ => &event.event_type,
            });
            rest = rest.get(close + 1..).unwrap_or("");
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_once_and_refuses_unknown_placeholders() {
        let event = Event::builder("{type}", "o-1", 1, "Placed")
            .build()
            .unwrap();
        let key = RoutingKey::template("x.{aggregatetype}.{type}.{aggregateid}").unwrap();
        assert_eq!(key.render(&event), "x.{type}.Placed.o-1");
        assert!(RoutingKey::template("{nope}").is_err());
        assert!(RoutingKey::template("a.{type").is_err());
    }
}
