//! The Lambda functions' init: a missing variable fails it, naming the
//! variable, before any AWS call.

#![allow(clippy::unwrap_used)] // tests fail loudly

use std::process::Command;

fn init_error(exe: &str, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(exe);
    for var in [
        "ORDERS_TABLE",
        "OUTBOX_TABLE",
        "SHIPMENTS_TABLE",
        "INBOX_TABLE",
    ] {
        command.env_remove(var);
    }
    // No Runtime API: the function must fail before it would look for one.
    command.env_remove("AWS_LAMBDA_RUNTIME_API");
    let out = command.envs(env.iter().copied()).output().unwrap();
    assert!(!out.status.success(), "{exe} started without its settings");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn orders_api_names_its_missing_variables() {
    let exe = env!("CARGO_BIN_EXE_orders-api");
    let err = init_error(exe, &[]);
    assert!(err.contains("ORDERS_TABLE is not set"), "{err}");
    let err = init_error(exe, &[("ORDERS_TABLE", "OrdersTable")]);
    assert!(err.contains("OUTBOX_TABLE is not set"), "{err}");
}

#[test]
fn shipping_names_its_missing_variables() {
    let exe = env!("CARGO_BIN_EXE_shipping");
    let err = init_error(exe, &[]);
    assert!(err.contains("SHIPMENTS_TABLE is not set"), "{err}");
    let err = init_error(exe, &[("SHIPMENTS_TABLE", "ShipmentsTable")]);
    assert!(err.contains("INBOX_TABLE is not set"), "{err}");
}
