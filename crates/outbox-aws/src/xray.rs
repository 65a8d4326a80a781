//! W3C `traceparent` to the AWS X-Ray trace header, so a trace started by the
//! writer continues through EventBridge, SQS and SNS.

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` becomes
/// `Root=1-<8 hex>-<24 hex>;Parent=<16 hex>;Sampled=<0|1>`: X-Ray's root is
/// the same 128 bits, its first 32 read as the epoch seconds. `None` for a
/// value that is not a valid version-00 traceparent.
pub fn trace_header(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.next().is_some()
        || version != "00"
        || !hex(trace_id, 32)
        || !hex(parent_id, 16)
        || !hex(flags, 2)
        || trace_id.bytes().all(|b| b == b'0')
        || parent_id.bytes().all(|b| b == b'0')
    {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1;
    Some(format!(
        "Root=1-{}-{};Parent={};Sampled={sampled}",
        &trace_id[..8].to_ascii_lowercase(),
        &trace_id[8..].to_ascii_lowercase(),
        parent_id.to_ascii_lowercase()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_valid_traceparents_only() {
        assert_eq!(
            trace_header("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        assert!(
            trace_header("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .ends_with("Sampled=0")
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-zzf067aa0ba902b7-01",
        ] {
            assert_eq!(trace_header(bad), None, "{bad}");
        }
    }
}
