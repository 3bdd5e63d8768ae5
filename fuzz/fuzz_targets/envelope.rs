//! Fuzzes the wire-contract decoder: no input may panic it, and whatever it accepts must
//! satisfy the contract's invariants (docs/protocol.md, Validation).
#![no_main]

use dagster_taskiq_controller::envelope::{decode, MAX_BODY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    match decode(body) {
        Ok(step) => {
            assert!(body.len() <= MAX_BODY_BYTES);
            assert!((1..=64).contains(&step.task_id.len()));
            assert!(step
                .task_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
            assert!(step
                .step_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.[]-".contains(&b)));
            assert!(step
                .run_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
            assert!(!step.compressed_step_args().is_empty());
        }
        Err(poison) => {
            assert!(!poison.name().is_empty());
            assert!(!poison.to_string().is_empty());
        }
    }
});
