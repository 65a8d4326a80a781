//! The functions' settings, read from environment variables at init: a
//! missing one fails the init with an error naming it.

use outbox_lambda::ConfigError;

/// `orders-api`: the orders table (template: `OrdersTable`).
pub const ORDERS_TABLE_VAR: &str = "ORDERS_TABLE";
/// `orders-api`: the outbox table, stream shape (template: `OutboxTable`).
pub const OUTBOX_TABLE_VAR: &str = "OUTBOX_TABLE";
/// `shipping`: the shipments table (template: `ShipmentsTable`).
pub const SHIPMENTS_TABLE_VAR: &str = "SHIPMENTS_TABLE";
/// `shipping`: its inbox table (template: `ShippingInboxTable`).
pub const INBOX_TABLE_VAR: &str = "INBOX_TABLE";

/// The value of `var`; unset or empty is an error naming it.
pub fn required(var: &'static str, hint: &'static str) -> Result<String, ConfigError> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        Ok(_) | Err(std::env::VarError::NotPresent) => Err(ConfigError::Missing { var, hint }),
        Err(std::env::VarError::NotUnicode(raw)) => Err(ConfigError::Invalid {
            var,
            value: raw.to_string_lossy().into_owned(),
            reason: "not valid UTF-8".to_owned(),
        }),
    }
}
