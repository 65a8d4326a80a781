//! For tests that talk to the local emulators.

/// Panics with instructions unless every service named (`DYNAMODB`,
/// `DYNAMODB_STREAMS`, `EVENTBRIDGE`, `SQS`, `SNS`) has an
/// `AWS_ENDPOINT_URL_<SERVICE>` pointing at a local emulator, so a test never
/// reaches a real AWS account by accident.
pub fn require_local_endpoints(services: &[&str]) {
    for service in services {
        let var = format!("AWS_ENDPOINT_URL_{service}");
        match std::env::var(&var) {
            Ok(url)
                if url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost") => {}
            Ok(url) => {
                panic!("{var}={url} is not a local emulator; tests only run against 127.0.0.1")
            }
            Err(_) => panic!(
                "{var} is not set: start the emulators and load their endpoints with\n\
                 \n    scripts/services start && eval \"$(scripts/services env)\"\n\
                 \n(scripts/test does both)"
            ),
        }
    }
}

/// A name no other test run uses, for tables, buses and queues.
pub fn unique_name(prefix: &str) -> String {
    let id = outbox_core::EventId::new().to_string();
    format!("{prefix}-{}", &id[id.len() - 12..])
}
